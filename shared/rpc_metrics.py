"""The RPC metrics of every server: one interceptor counts and times each call by method
and status code (installed by shared.grpc_server when METRICS_ADDR is set)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import Counter, Histogram

# From a millisecond (GetStory) to a minute (GenerateStory with a slow model); streams that
# last longer land in +Inf, which is what they are.
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# Method names come from callers; only those the process serves become label values.
UNKNOWN_METHOD = "unknown"

# The names go-grpc-prometheus and py-grpc-prometheus use, so existing dashboards fit.
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
RPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", (*_RPC_LABELS, "grpc_code")
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its status (a stream's whole life).",
    _RPC_LABELS,
    buckets=RPC_SECONDS_BUCKETS,
)


@functools.lru_cache(maxsize=512)
def _rpc_labels(full_method: str, streaming: bool) -> tuple[str, str, str]:
    """(grpc_type, grpc_service, grpc_method) for "/pkg.Service/Method"; unknown names
    (a caller's garbage) all share one label set, so they cannot grow the metrics."""
    service, _, method = full_method.lstrip("/").partition("/")
    try:
        descriptor = descriptor_pool.Default().FindServiceByName(service)
        found = descriptor.methods_by_name.get(method)
    except KeyError:
        found = None
    if found is None:
        return ("unary" if not streaming else "server_stream", UNKNOWN_METHOD, UNKNOWN_METHOD)
    kind = {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream"}.get(
        (found.client_streaming, found.server_streaming), "bidi_stream"
    )
    return (kind, service, method)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and status code and times it. Put it first, so the calls
    that later interceptors refuse (a missing token) are counted too."""

    def __init__(self) -> None:
        # method -> (the handler grpc gave, its timed twin). grpc answers each served method
        # with the same handler object, so the twin (and its label children) is built once
        # instead of on every call; a different handler (a refusal's) gets one of its own.
        # Only methods the process serves are kept, so callers' names cannot grow it.
        self._timed: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED itself
        known = self._timed.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        timed = _timed_handler(handler, details.method)
        if timed is not handler and _rpc_labels(details.method, handler.unary_stream is not None)[1] != UNKNOWN_METHOD:
            self._timed[details.method] = (handler, timed)
        return timed


def _timed_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _timed_unary(handler.unary_unary, _Recorder(_rpc_labels(method, False))),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _timed_stream(handler.unary_stream, _Recorder(_rpc_labels(method, True))),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler  # no client-streaming methods are served; left as they are


class _Recorder:
    """One method's metric children, looked up once: labels() takes a lock and checks its
    arguments on every use, three times per call."""

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self._started = RPC_STARTED.labels(*labels)
        self._seconds = RPC_SECONDS.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def started(self) -> None:
        self._started.inc()

    def record(self, code: grpc.StatusCode, started: float) -> None:
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = RPC_HANDLED.labels(*self.labels, code.name)
        handled.inc()
        self._seconds.observe(time.perf_counter() - started)


def _timed_unary(behaviour: Callable[..., Any], recorder: _Recorder) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        recorder.started()
        started = time.perf_counter()
        try:
            response = behaviour(request, context)
            if inspect.isawaitable(response):
                response = await response
        except BaseException as error:
            _record_failure(recorder, context, started, error)
            raise
        _record_success(recorder, context, started)
        return response

    return handle


def _timed_stream(behaviour: Callable[..., Any], recorder: _Recorder) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        recorder.started()
        started = time.perf_counter()
        try:
            responses = behaviour(request, context)
            if inspect.isasyncgen(responses):
                async for response in responses:
                    yield response
            elif inspect.isawaitable(responses):
                await responses  # a handler that writes with context.write, or only aborts
        except BaseException as error:
            _record_failure(recorder, context, started, error)
            raise
        _record_success(recorder, context, started)

    return handle


def _record_success(recorder: _Recorder, context: grpc.aio.ServicerContext, started: float) -> None:
    code = context.code()  # None unless the handler set one
    recorder.record(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK, started)


def _record_failure(recorder: _Recorder, context: grpc.aio.ServicerContext, started: float, error: BaseException) -> None:
    code = context.code()
    if isinstance(error, asyncio.CancelledError) and not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.CANCELLED
    elif not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN  # an exception nobody turned into a status
    recorder.record(code, started)

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

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED itself
        if handler.unary_unary is not None:
            labels = _rpc_labels(details.method, False)
            return grpc.unary_unary_rpc_method_handler(
                _timed_unary(handler.unary_unary, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            labels = _rpc_labels(details.method, True)
            return grpc.unary_stream_rpc_method_handler(
                _timed_stream(handler.unary_stream, labels),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming methods are served; left as they are


def _timed_unary(behaviour: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        RPC_STARTED.labels(*labels).inc()
        started = time.perf_counter()
        try:
            response = behaviour(request, context)
            if inspect.isawaitable(response):
                response = await response
        except BaseException as error:
            _record_failure(labels, context, started, error)
            raise
        _record_success(labels, context, started)
        return response

    return handle


def _timed_stream(behaviour: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        RPC_STARTED.labels(*labels).inc()
        started = time.perf_counter()
        try:
            responses = behaviour(request, context)
            if inspect.isasyncgen(responses):
                async for response in responses:
                    yield response
            elif inspect.isawaitable(responses):
                await responses  # a handler that writes with context.write, or only aborts
        except BaseException as error:
            _record_failure(labels, context, started, error)
            raise
        _record_success(labels, context, started)

    return handle


def _record_success(labels: tuple[str, str, str], context: grpc.aio.ServicerContext, started: float) -> None:
    code = context.code()  # None unless the handler set one
    _record(labels, code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK, started)


def _record_failure(
    labels: tuple[str, str, str], context: grpc.aio.ServicerContext, started: float, error: BaseException
) -> None:
    code = context.code()
    if isinstance(error, asyncio.CancelledError) and not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.CANCELLED
    elif not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        code = grpc.StatusCode.UNKNOWN  # an exception nobody turned into a status
    _record(labels, code, started)


def _record(labels: tuple[str, str, str], code: grpc.StatusCode, started: float) -> None:
    RPC_HANDLED.labels(*labels, code.name).inc()
    RPC_SECONDS.labels(*labels).observe(time.perf_counter() - started)

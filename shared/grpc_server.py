"""Starting a grpc.aio server with health and reflection, and the common service main loop."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import uvloop
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.allocator import keep_large_buffers
from shared.config import ConfigError
from shared.grpc_errors import abort, invalid_argument
from shared.logs import configure_logging
from shared.metrics import MetricsEndpoint, serve_metrics
from shared.reflection import enable_reflection
from shared.rpc_metrics import RpcMetricsInterceptor

ConfigT = TypeVar("ConfigT")

log = logging.getLogger(__name__)

# Exit status of a process stopped by a second signal: 128 + SIGINT, as shells report it.
_FORCED_EXIT_STATUS = 130
# Exit status for a setting that is missing, malformed or unusable.
_CONFIG_ERROR_STATUS = 2
# gRPC enables SO_REUSEPORT by default: two processes could then bind the same port and
# silently share traffic. A port clash must fail loudly instead.
_SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # full service name, e.g. "casefile.story.v1.StoryService"
    register: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    # Run once the server stops taking new calls, before the grace: they end calls that
    # would otherwise run until cancelled (streams that wait for a change, say).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The /metrics endpoint, when METRICS_ADDR asked for one.
    metrics: MetricsEndpoint | None = None

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING first so balancers stop routing here, then drain calls."""
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace))
        for callback in self.on_stop:
            await callback()
        self.on_stop.clear()
        await stopping
        # Last, so the final scrape during the grace still answers.
        metrics, self.metrics = self.metrics, None
        if metrics is not None:
            await asyncio.to_thread(metrics.stop)


async def start_grpc_server(
    *,
    listen_addr: str,
    services: Sequence[ServiceSpec],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    metrics_addr: str | None = None,
    max_receive_bytes: int | None = None,
    listen_addr_name: str | None = None,
) -> RunningServer:
    """Serve `services` plus health and reflection on `listen_addr` (port 0: any free port).

    `listen_addr_name` is the variable `listen_addr` came from (STORY_ADDR, ...): an address
    nothing can listen on (a port in use) is then a ConfigError naming it.

    `max_receive_bytes` raises gRPC's 4 MiB cap on a request, for a service whose requests
    carry pictures: a field at its own limit must be refused by name, not by the transport.

    With `metrics_addr` (METRICS_ADDR) the process also serves Prometheus metrics there,
    and every RPC is counted and timed; without it neither costs anything.
    """
    if metrics_addr:
        # First, so that what later interceptors refuse is counted as well.
        interceptors = [RpcMetricsInterceptor(), *interceptors]
    options = _SERVER_OPTIONS
    if max_receive_bytes is not None:
        options = (*options, ("grpc.max_receive_message_length", max_receive_bytes))
    server = grpc.aio.server(interceptors=list(interceptors), options=options)
    for service in services:
        service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = [service.name for service in services]
    enable_reflection(server, [*service_names, health.SERVICE_NAME])
    port = _bind(server, listen_addr, listen_addr_name)
    metrics = serve_metrics(metrics_addr) if metrics_addr else None
    try:
        await server.start()
    except BaseException:
        if metrics is not None:
            metrics.stop()
        raise
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=port, health=health_servicer, metrics=metrics)


def add_strictly_decoded(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Registers `servicer` as the generated add_XServicer_to_server does, except that a
    request whose bytes do not parse as its message is INVALID_ARGUMENT (grpc's own
    deserializer makes that UNKNOWN). Unary and server-streaming methods."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported here")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _decoded_stream(behaviour, request_class), response_serializer=response_class.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _decoded_unary(behaviour, request_class), response_serializer=response_class.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


async def _decode(raw: bytes, request_class: type, context: grpc.aio.ServicerContext) -> object:
    try:
        return request_class.FromString(raw)
    except DecodeError as error:
        await abort(context, invalid_argument("request", f"is not a {request_class.DESCRIPTOR.full_name}: {error}"))


def _decoded_unary(behaviour: Callable, request_class: type) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> object:
        return await behaviour(await _decode(raw, request_class, context), context)

    return handle


def _decoded_stream(behaviour: Callable, request_class: type) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        responses = behaviour(await _decode(raw, request_class, context), context)
        if inspect.isawaitable(responses):
            # A plain coroutine (one that only aborts, say) streams nothing.
            await responses
            return
        async for response in responses:
            yield response

    return handle


def _bind(server: grpc.aio.Server, listen_addr: str, listen_addr_name: str | None) -> int:
    try:
        port = server.add_insecure_port(listen_addr)
    except RuntimeError:
        port = 0
    if port == 0:
        problem = f"cannot listen on {listen_addr}: the port is in use, or the address is not this machine's"
        if listen_addr_name:
            raise ConfigError(listen_addr_name, problem)
        raise OSError(problem)
    return port


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set `stop`; a second signal ends the process at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("service.exit_forced", extra={"signal": signum.name})
            logging.shutdown()
            os._exit(_FORCED_EXIT_STATUS)
        log.info("service.stop_requested", extra={"signal": signum.name})
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def run_service(
    name: str,
    build: Callable[[AsyncExitStack], Awaitable[RunningServer]],
    *,
    grace: float = 5.0,
) -> None:
    """Build, serve until SIGTERM/SIGINT, stop gracefully, then close what build() opened."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        async with AsyncExitStack() as stack:
            server = await build(stack)
            # Everything built so far (modules, protobuf descriptors, pools) lives as long as
            # the process: out of the collector's sight, a full collection under load walks
            # only what the calls themselves allocate.
            gc.freeze()
            metrics_url = server.metrics.url if server.metrics is not None else None
            log.info("service.started", extra={"service_name": name, "port": server.port, "metrics_url": metrics_url})
            await stop.wait()
            log.info("service.stop_started", extra={"service_name": name, "grace_seconds": grace})
            await server.stop(grace)
    except ConfigError as error:
        # A setting that looked right but is unusable (DATABASE_URL names no reachable
        # database): the same clear one-line answer as a malformed setting.
        log.error("config.rejected", extra={"service_name": name, "error": str(error)})
        raise SystemExit(_CONFIG_ERROR_STATUS) from None
    except Exception:
        # Logged here so that the reason a service died is a JSON line like everything else.
        log.exception("service.failed", extra={"service_name": name})
        raise
    log.info("service.stopped", extra={"service_name": name})


def serve_main(
    name: str,
    read_config: Callable[[Mapping[str, str]], ConfigT],
    build: Callable[[ConfigT, AsyncExitStack], Awaitable[RunningServer]],
) -> None:
    """A service's whole `main()`: JSON logs, config from the environment, serve.

    Exit status 2 for a bad setting (the log line names the variable), 1 for a crash.
    """
    level = os.environ.get("LOG_LEVEL", "INFO")
    try:
        configure_logging(name, level)
    except ValueError:
        # Said as every other bad setting is, in JSON, at the level the service would have had.
        configure_logging(name, "INFO")
        log.error("config.rejected", extra={"service_name": name,
                                            "error": f"LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, not {level!r}"})
        sys.exit(_CONFIG_ERROR_STATUS)
    try:
        config = read_config(os.environ)
    except ConfigError as error:
        log.error("config.rejected", extra={"service_name": name, "error": str(error)})
        sys.exit(_CONFIG_ERROR_STATUS)
    keep_large_buffers()
    try:
        # uvloop: asyncpg's own loop of choice. Its C timers and transports halve the client
        # side of every database round trip, and the bare grpc.aio echo answers with about
        # a fifth less CPU per call (tests/bench measures both).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_service(name, lambda stack: build(config, stack)))
    except Exception:  # noqa: BLE001 - run_service logged it as one JSON line already
        sys.exit(1)

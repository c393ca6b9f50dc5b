"""Prometheus metrics: the endpoint each service serves on METRICS_ADDR, values read at
scrape time, and the metric objects more than one service records (the RPC metrics and
their interceptor are in shared/rpc_metrics.py, so that domain code recording a metric
never imports grpc).

Metric objects are module-level definitions, like loggers: they hold no connection and do
nothing until something records into them, and prometheus-client's registry is one per
process by design. What must read a database or NATS to answer (an outbox backlog, a
consumer's pending count, ledger totals) is a ScrapeCollector: it runs its coroutine on the
service's own event loop when Prometheus scrapes, so the numbers are current and nothing
polls in between. README.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Model calls take seconds: a story, a picture.
PROVIDER_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 90, 120)

PROVIDER_CALL_SECONDS = Histogram(
    "casefile_provider_call_seconds",
    "One call to an outside model API (a story writer or an image provider), by its outcome.",
    ("kind", "provider", "outcome"),
    buckets=PROVIDER_SECONDS_BUCKETS,
)
PROVIDER_RETRIES = Counter(
    "casefile_provider_retries_total",
    "Calls to an outside model API that will be (or were) tried again, by why.",
    ("kind", "provider", "reason"),
)


class ProviderKind:
    WRITER = "writer"  # a story writer's chat model (story service)
    IMAGE = "image"  # an image provider (image service)


class ProviderOutcome:
    OK = "ok"
    TRANSIENT_ERROR = "transient_error"  # worth another try
    PERMANENT_ERROR = "permanent_error"  # a refusal, a bad key, an unusable answer


def retry_reason(status: int | None, *, timed_out: bool = False) -> str:
    """Why a call is tried again, from its HTTP status: a short, bounded label value."""
    if timed_out:
        return "timeout"
    if status is None:
        return "network"
    if status == 429:
        return "rate_limited"
    if status in (503, 529):
        return "overloaded"
    if status >= 500:
        return "server_error"
    return f"http_{status}"


def observe_provider_call(kind: str, provider: str, outcome: str, seconds: float) -> None:
    PROVIDER_CALL_SECONDS.labels(kind, provider, outcome).observe(seconds)


# ---------------------------------------------------------------- the endpoint


@dataclass
class MetricsEndpoint:
    """The HTTP server of /metrics, in a thread of its own (prometheus-client's)."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(addr: str) -> MetricsEndpoint:
    """Serves the process's metrics on `addr` ("host:port"; port 0 picks a free one)."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        server, thread = start_http_server(int(port), addr=host, registry=REGISTRY)
    except OSError as error:
        raise OSError(f"METRICS_ADDR: cannot listen on {addr}: {error}") from error
    endpoint = MetricsEndpoint(host, server.server_port, server, thread)
    log.info("metrics.endpoint_started", extra={"url": endpoint.url})
    return endpoint


# ---------------------------------------------------------------- values read at scrape time


class ScrapeCollector(Collector):
    """Metric families that `read` produces on the service's event loop at each scrape.

    Create it on that loop; `close()` unregisters it. A read that fails or takes longer than
    `timeout` leaves its families out of that scrape (and logs why): a scrape never hangs
    on a database or a NATS that is away.
    """

    def __init__(self, name: str, read: Callable[[], Awaitable[Iterable[Metric]]], *, timeout: float = 2.0) -> None:
        self.name = name
        self._read = read
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        REGISTRY.register(self)

    def describe(self) -> list[Metric]:
        # Without this the registry would call collect() at registration, on the loop's own
        # thread, which waits for the loop: a deadlock.
        return []

    def collect(self) -> Iterable[Metric]:
        if threading.get_ident() == self._loop_thread or self._loop.is_closed():
            return []
        try:
            future = asyncio.run_coroutine_threadsafe(self._read_all(), self._loop)
        except RuntimeError:  # the loop stopped meanwhile
            return []
        try:
            return future.result(timeout=self._timeout)
        except Exception as error:  # noqa: BLE001 - one source away must not break the scrape
            future.cancel()
            log.warning("metrics.collect_failed", extra={"collector": self.name, "error": repr(error)})
            return []

    async def _read_all(self) -> list[Metric]:
        return list(await self._read())

    def close(self) -> None:
        REGISTRY.unregister(self)

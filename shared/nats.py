"""NATS connections that survive outages, and idempotent JetStream stream/consumer setup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

_RECONNECT_WAIT_SECONDS = 0.5
# Seconds a single TCP/handshake attempt may take.
_CONNECT_TIMEOUT_SECONDS = 2
# A dead peer is noticed after ping_interval * max_outstanding_pings instead of minutes.
_PING_INTERVAL_SECONDS = 10


def redact_url(url: str) -> str:
    """The URL without user:password, safe to log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class _ConnectionEvents:
    """Turns nats-py's callbacks into JSON log events."""

    def __init__(self, url: str, name: str) -> None:
        self._fields = {"nats_url": redact_url(url), "client_name": name}
        self.connected_once = False

    async def on_error(self, error: Exception) -> None:
        event = "nats.error" if self.connected_once else "nats.connect_failed"
        log.warning(event, extra={**self._fields, "error": repr(error)})

    async def on_disconnected(self) -> None:
        log.warning("nats.disconnected", extra=self._fields)

    async def on_reconnected(self) -> None:
        log.info("nats.reconnected", extra=self._fields)

    async def on_closed(self) -> None:
        log.info("nats.closed", extra=self._fields)


async def _connect_forever(url: str, name: str, retry_delay: float) -> Client:
    """Keeps trying until connected; once connected, reconnects forever on its own."""
    events = _ConnectionEvents(url, name)
    client = Client()
    try:
        # With max_reconnect_attempts=-1 nats-py retries the first connect forever too, so
        # callers bound that wait themselves (timeout or stop event).
        await client.connect(
            url,
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=retry_delay,
            connect_timeout=_CONNECT_TIMEOUT_SECONDS,
            ping_interval=_PING_INTERVAL_SECONDS,
            error_cb=events.on_error,
            disconnected_cb=events.on_disconnected,
            reconnected_cb=events.on_reconnected,
            closed_cb=events.on_closed,
        )
    except BaseException:
        await client.close()
        raise
    events.connected_once = True
    log.info("nats.connected", extra={"nats_url": redact_url(url), "client_name": name})
    return client


async def connect_nats(url: str, *, name: str, timeout: float = 5.0) -> Client:
    """Connect now or raise ConnectionError; after that, reconnect forever."""
    try:
        # asyncio.timeout, not wait_for, which can swallow a cancellation on Python 3.11.
        async with asyncio.timeout(timeout):
            return await _connect_forever(url, name, _RECONNECT_WAIT_SECONDS)
    except TimeoutError:
        raise ConnectionError(
            f"nats: no server answered at {redact_url(url)} within {timeout}s"
        ) from None


async def connect_nats_until_ready(
    url: str, *, name: str, stop: asyncio.Event | None = None, retry_delay: float = 1.0
) -> Client | None:
    """Keep trying the first connect (logging each failure); None if `stop` is set first."""
    connecting = asyncio.ensure_future(_connect_forever(url, name, retry_delay))
    if stop is None:
        return await connecting
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also on our own cancellation: a forgotten attempt would reconnect forever.
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    return None if connecting.cancelled() else connecting.result()


def msg_id_headers(msg_id: str) -> dict[str, str]:
    """Headers that let JetStream drop a re-publish of the same message."""
    return {"Nats-Msg-Id": msg_id}


async def ensure_stream(
    js: JetStreamContext,
    *,
    name: str,
    subjects: list[str],
    max_age_seconds: float | None = None,
    duplicate_window_seconds: float = 120,
) -> None:
    """Create the stream, or update it when its settings differ; file storage."""
    wanted = StreamConfig(
        name=name,
        subjects=list(subjects),
        storage=StorageType.FILE,
        max_age=max_age_seconds or 0,
        duplicate_window=duplicate_window_seconds,
    )
    try:
        current = (await js.stream_info(name)).config
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("nats.stream_created", extra={"stream": name, "subjects": subjects})
        return
    if _stream_differs(current, wanted):
        await js.update_stream(wanted)
        log.info("nats.stream_updated", extra={"stream": name, "subjects": subjects})


def _stream_differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    return (
        sorted(current.subjects or []) != sorted(wanted.subjects or [])
        or not _same_seconds(current.max_age or 0, wanted.max_age or 0)
        or not _same_seconds(current.duplicate_window or 0, wanted.duplicate_window or 0)
    )


async def ensure_pull_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subject: str,
    ack_wait_seconds: float,
    max_deliver: int,
    backoff_seconds: list[float] | None,
    max_ack_pending: int,
) -> None:
    """Create the durable pull consumer (explicit ack), or update it when settings differ.

    With `backoff_seconds`, JetStream waits backoff[n] for the ack of delivery n+1 and
    ignores `ack_wait_seconds` (it stores backoff[0] as ack_wait): a worker that needs longer
    must call `msg.in_progress()`. max_deliver must exceed len(backoff_seconds).
    """
    if backoff_seconds and backoff_seconds[0] < ack_wait_seconds:
        log.warning(
            "nats.backoff_overrides_ack_wait",
            extra={"consumer": durable, "ack_wait": ack_wait_seconds, "backoff": backoff_seconds},
        )
    wanted = ConsumerConfig(
        name=durable,
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=filter_subject,
        ack_wait=ack_wait_seconds,
        max_deliver=max_deliver,
        backoff=list(backoff_seconds) if backoff_seconds else None,
        max_ack_pending=max_ack_pending,
    )
    try:
        current = (await js.consumer_info(stream, durable)).config
    except NotFoundError:
        await js.add_consumer(stream, wanted)
        log.info("nats.consumer_created", extra={"stream": stream, "consumer": durable})
        return
    if _consumer_differs(current, wanted):
        # The server treats a create for an existing durable as an update of its settings.
        await js.add_consumer(stream, wanted)
        log.info("nats.consumer_updated", extra={"stream": stream, "consumer": durable})


def _consumer_differs(current: ConsumerConfig, wanted: ConsumerConfig) -> bool:
    return (
        current.filter_subject != wanted.filter_subject
        or not _same_seconds(current.ack_wait or 0, _effective_ack_wait(wanted))
        or current.max_deliver != wanted.max_deliver
        or not _same_seconds_list(current.backoff or [], wanted.backoff or [])
        or current.max_ack_pending != wanted.max_ack_pending
    )


def _effective_ack_wait(config: ConsumerConfig) -> float:
    # What the server reports back: with a backoff list, its first step replaces ack_wait.
    return config.backoff[0] if config.backoff else (config.ack_wait or 0)


def _same_seconds(a: float, b: float) -> bool:
    # The server stores nanoseconds; a float round trip must not count as a change.
    return math.isclose(a, b, abs_tol=1e-6)


def _same_seconds_list(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(_same_seconds(x, y) for x, y in zip(a, b, strict=True))

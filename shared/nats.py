"""NATS connections that survive outages, and idempotent JetStream stream/consumer setup.

Connections take a `NatsSettings` (or a bare URL for tests), so a password or token never
travels in a URL that might be logged. Streams are declared from a `StreamSpec`
(shared/streams.py lists them all): a stream that exists is never reset, only given the
subjects it lacks, so limits or replicas an operator raised survive every start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.config import NatsSettings

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


NatsTarget = NatsSettings | str


def _settings(target: NatsTarget) -> NatsSettings:
    return target if isinstance(target, NatsSettings) else NatsSettings(url=target)


async def _connect_forever(target: NatsTarget, name: str, retry_delay: float) -> Client:
    """Keeps trying until connected; once connected, reconnects forever on its own."""
    settings = _settings(target)
    url = settings.url
    events = _ConnectionEvents(url, name)
    client = Client()
    try:
        # With max_reconnect_attempts=-1 nats-py retries the first connect forever too, so
        # callers bound that wait themselves (timeout or stop event).
        await client.connect(
            url,
            name=name,
            **settings.connect_options(),
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


async def connect_nats(target: NatsTarget, *, name: str, timeout: float = 5.0) -> Client:
    """Connect now or raise ConnectionError; after that, reconnect forever."""
    try:
        # asyncio.timeout, not wait_for, which can swallow a cancellation on Python 3.11.
        async with asyncio.timeout(timeout):
            return await _connect_forever(target, name, _RECONNECT_WAIT_SECONDS)
    except TimeoutError:
        raise ConnectionError(
            f"nats: no server answered at {redact_url(_settings(target).url)} within {timeout}s"
        ) from None


async def connect_nats_until_ready(
    target: NatsTarget, *, name: str, stop: asyncio.Event | None = None, retry_delay: float = 1.0
) -> Client | None:
    """Keep trying the first connect (logging each failure); None if `stop` is set first."""
    connecting = asyncio.ensure_future(_connect_forever(target, name, retry_delay))
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


@dataclass(frozen=True)
class StreamSpec:
    """What a stream must be at least: its subjects and the limits it is created with."""

    name: str
    subjects: tuple[str, ...]
    max_age_seconds: float = 0
    duplicate_window_seconds: float = 120


async def ensure_stream(
    js: JetStreamContext,
    spec: StreamSpec | None = None,
    *,
    replicas: int = 1,
    name: str | None = None,
    subjects: list[str] | None = None,
    max_age_seconds: float | None = None,
    duplicate_window_seconds: float = 120,
) -> None:
    """Create the stream (file storage, `replicas` copies) or add the subjects it lacks.

    An existing stream keeps every other setting, whatever it is: an operator may have
    raised its replicas or limits, and a start-up must never undo that. A difference from
    the spec is logged, not "fixed".
    """
    if spec is None:
        spec = StreamSpec(name or "", tuple(subjects or ()), max_age_seconds or 0, duplicate_window_seconds)
    wanted = StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=StorageType.FILE,
        max_age=spec.max_age_seconds or 0,
        duplicate_window=spec.duplicate_window_seconds,
        num_replicas=replicas,
    )
    try:
        current = (await js.stream_info(spec.name)).config
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("nats.stream_created", extra={"stream": spec.name, "subjects": list(spec.subjects), "replicas": replicas})
        return
    _log_differences(current, wanted)
    missing = [subject for subject in spec.subjects if subject not in (current.subjects or [])]
    if missing:
        await js.update_stream(replace(current, subjects=[*(current.subjects or []), *missing]))
        log.info("nats.stream_subjects_added", extra={"stream": spec.name, "subjects": missing})


def _log_differences(current: StreamConfig, wanted: StreamConfig) -> None:
    differences = {
        setting: {"current": mine, "declared": theirs}
        for setting, mine, theirs in (
            ("num_replicas", current.num_replicas or 1, wanted.num_replicas or 1),
            ("max_age", current.max_age or 0, wanted.max_age or 0),
            ("duplicate_window", current.duplicate_window or 0, wanted.duplicate_window or 0),
        )
        if not _same_seconds(mine, theirs)
    }
    if differences:
        log.warning("nats.stream_settings_kept", extra={"stream": current.name, "differences": differences})


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
            "nats.ack_wait_overridden",
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

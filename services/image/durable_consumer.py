"""A durable JetStream pull consumer shared by every process of the service.

It knows nothing of what the messages mean: a handler gets each message's bytes and its
delivery number and answers with an Outcome (Ack, Retry after a delay, or Term). The loop
owns what every pipeline needs around that:

- per-process concurrency: it fetches only as many messages as it has free slots, so a
  message waits in the stream (where any process may take it), never in a local queue;
  the consumer's max_ack_pending is set far above processes x concurrency, so adding
  processes adds throughput and messages waiting out a retry delay block nobody;
- heartbeats: while a handler works, `in_progress()` every ack_wait / 3 keeps its message,
  so ack_wait can be short and a killed process's messages come back quickly;
- a bound on each handler's work (`max_work_seconds`): past it the handler is cancelled
  and its heartbeats stop, so no message is held forever by a stuck worker;
- shutdown: stop fetching, let work finish for a grace period, nak what is left.

NATS being down at start-up or later only pauses the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from shared.metrics import ScrapeCollector
from shared.nats import NatsTarget, StreamSpec, connect_nats_until_ready, ensure_pull_consumer, ensure_stream

log = logging.getLogger(__name__)

HEARTBEATS_PER_ACK_WAIT = 3
_CONSUMER_INFO_TIMEOUT_SECONDS = 2.0

DELIVERIES = Counter(
    "casefile_consumer_deliveries_total",
    "Messages this process handled, by what it answered (ack, retry, term, exhausted).",
    ["consumer", "verdict"],
)
REDELIVERIES = Counter(
    "casefile_consumer_redeliveries_total",
    "Messages this process received that JetStream had delivered before (a retry, a crashed or slow worker).",
    ["consumer"],
)
IN_FLIGHT = Gauge("casefile_consumer_in_flight", "Messages this process is working on now.", ["consumer"])


class Verdict(enum.Enum):
    ACK = "ack"  # done for good
    RETRY = "retry"  # a later delivery may succeed (nak with a delay)
    TERM = "term"  # can never succeed; never deliver again


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    # For RETRY: how long to wait before the next delivery (None: the consumer's backoff).
    delay_seconds: float | None = None
    status: str = ""  # for the log line: what the handler did
    reason: str | None = None


def ack(status: str = "done") -> Outcome:
    return Outcome(Verdict.ACK, status=status)


def retry(reason: str, *, delay_seconds: float | None = None, status: str = "retry") -> Outcome:
    return Outcome(Verdict.RETRY, delay_seconds, status, reason)


def term(reason: str) -> Outcome:
    return Outcome(Verdict.TERM, status="terminated", reason=reason)


@dataclass(frozen=True)
class Delivery:
    data: bytes
    number: int  # 1 for the first delivery
    final: bool  # no delivery will follow this one
    stream_sequence: int


Handler = Callable[[Delivery], Awaitable[Outcome]]


@dataclass(frozen=True)
class ConsumerSettings:
    nats: NatsTarget
    stream: StreamSpec
    durable: str
    filter_subject: str
    concurrency: int
    # None: deliver until acked (a dead-letter consumer that must eventually succeed).
    max_deliver: int | None
    max_ack_pending: int
    redelivery_backoff_seconds: tuple[float, ...]
    max_work_seconds: float
    # Short, because a live worker keeps its message with heartbeats; a crashed one loses
    # it within one ack wait.
    ack_wait_seconds: float = 15.0
    stream_replicas: int = 1
    # Streams declared before the consumer (e.g. a dead-letter stream that must exist
    # before the first advisory it keeps is published).
    other_streams: Sequence[StreamSpec] = ()
    # Also the longest stop() waits for a fetch under way.
    fetch_timeout_seconds: float = 1.0
    retry_delay_seconds: float = 1.0
    shutdown_grace_seconds: float = 5.0
    client_name: str = "image-consumer"

    @property
    def heartbeat_interval_seconds(self) -> float:
        return self.ack_wait_seconds / HEARTBEATS_PER_ACK_WAIT

    def nak_delay(self, delivery: int) -> float:
        """The wait before delivery number `delivery + 1`; the last entry repeats."""
        delays = self.redelivery_backoff_seconds
        return delays[min(max(delivery, 1), len(delays)) - 1]


class DurableConsumer:
    def __init__(self, settings: ConsumerSettings, handle: Handler) -> None:
        self._settings = settings
        self._handle_delivery = handle
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._fetching = False
        self.ready = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self._settings.durable}")

    async def stop(self) -> None:
        """Stops fetching, lets work in flight finish for a moment, then cancels it and closes NATS."""
        self._stopping.set()
        await self._stop_fetching()
        cancelled = await self._finish_in_flight()
        if self._nc is not None:
            await _close_quietly(self._nc)
        log.info("consumer.stopped", extra={"consumer": self._settings.durable, "cancelled": cancelled})

    async def _stop_fetching(self) -> None:
        if self._task is None:
            return
        if not self._fetching:
            self._task.cancel()
        # A fetch under way is let run out rather than cancelled: its pull request would
        # stay on the server and hand the next messages to a subscription nobody reads,
        # where they would wait out the whole ack wait.
        await asyncio.wait({self._task}, timeout=self._settings.fetch_timeout_seconds + 1)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _finish_in_flight(self) -> int:
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=self._settings.shutdown_grace_seconds)
        unfinished = list(self._in_flight)
        for task in unfinished:
            task.cancel()  # _handle naks its message so another process takes it at once
        await asyncio.gather(*unfinished, return_exceptions=True)
        return len(unfinished)

    async def _run(self) -> None:
        settings = self._settings
        self._nc = await connect_nats_until_ready(
            settings.nats, name=settings.client_name, stop=self._stopping, retry_delay=settings.retry_delay_seconds
        )
        if self._nc is None:
            return  # stopped before NATS ever answered
        js = self._nc.jetstream()
        while not self._stopping.is_set():
            subscription = None
            try:
                subscription = await self._subscribe(js)
                await self._fetch_until_stopped(subscription)
            except Exception as error:
                # Timeouts of the JetStream API, a deleted consumer, a restarted server:
                # declare everything again after a pause, and go on.
                self.ready.clear()
                log.warning(
                    "consumer.fetch_failed",
                    extra={"consumer": settings.durable, "error": f"{type(error).__name__}: {error}"},
                )
                await _unsubscribe_quietly(subscription)
                await asyncio.sleep(settings.retry_delay_seconds)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        settings = self._settings
        for stream in (*settings.other_streams, settings.stream):
            await ensure_stream(js, stream, replicas=settings.stream_replicas)
        # No consumer-level backoff: the server would use its first entry as the ack wait
        # and redeliver work still in progress. Delays come from nak(delay) instead.
        await ensure_pull_consumer(
            js,
            stream=settings.stream.name,
            durable=settings.durable,
            filter_subject=settings.filter_subject,
            ack_wait_seconds=settings.ack_wait_seconds,
            max_deliver=settings.max_deliver or -1,
            backoff_seconds=None,
            max_ack_pending=settings.max_ack_pending,
        )
        subscription = await js.pull_subscribe_bind(settings.durable, stream=settings.stream.name)
        log.info("consumer.subscribed", extra={"stream": settings.stream.name, "consumer": settings.durable})
        self.ready.set()
        return subscription

    async def _fetch_until_stopped(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            await self._wait_for_free_slot()
            if self._stopping.is_set():
                return
            free_slots = self._settings.concurrency - len(self._in_flight)
            self._fetching = True
            try:
                messages = await subscription.fetch(free_slots, timeout=self._settings.fetch_timeout_seconds)
            except TimeoutError:
                continue  # nothing to do right now, or NATS is away and will be back
            finally:
                self._fetching = False
            if self._stopping.is_set():
                await _hand_back(messages)
                return
            for message in messages:
                self._spawn(message)

    async def _wait_for_free_slot(self) -> None:
        while len(self._in_flight) >= self._settings.concurrency:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)

    def _spawn(self, message: Msg) -> None:
        task = asyncio.create_task(self._handle(message), name=f"{self._settings.durable}-message")
        self._in_flight.add(task)
        in_flight = IN_FLIGHT.labels(self._settings.durable)
        in_flight.inc()

        def done(finished: asyncio.Task[None]) -> None:
            self._in_flight.discard(finished)
            in_flight.dec()

        task.add_done_callback(done)

    def metrics(self) -> ScrapeCollector:
        """Registers what JetStream says of this consumer (asked at each scrape) with the
        process's metrics; close() unregisters it. Every process reports the same consumer,
        so aggregate with max()."""
        settings = self._settings

        async def read() -> list[Metric]:
            if self._nc is None or not self._nc.is_connected:
                return []
            info = await self._nc.jetstream().consumer_info(
                settings.stream.name, settings.durable, timeout=_CONSUMER_INFO_TIMEOUT_SECONDS
            )
            families = []
            for name, value, meaning in (
                ("casefile_consumer_pending_messages", info.num_pending, "Messages in the stream not yet delivered."),
                (
                    "casefile_consumer_ack_pending_messages",
                    info.num_ack_pending,
                    "Messages delivered and not yet acknowledged (in work, or waiting out a retry delay).",
                ),
                (
                    "casefile_consumer_redelivered_messages",
                    info.num_redelivered,
                    "Messages pending acknowledgement that were delivered more than once.",
                ),
            ):
                family = GaugeMetricFamily(name, meaning, labels=["consumer"])
                family.add_metric([settings.durable], value or 0)
                families.append(family)
            return families

        return ScrapeCollector(f"consumer {settings.durable}", read, timeout=_CONSUMER_INFO_TIMEOUT_SECONDS + 0.5)

    async def _handle(self, message: Msg) -> None:
        settings = self._settings
        metadata = message.metadata
        delivery = Delivery(
            data=message.data,
            number=metadata.num_delivered,
            final=settings.max_deliver is not None and metadata.num_delivered >= settings.max_deliver,
            stream_sequence=metadata.sequence.stream,
        )
        fields = {"consumer": settings.durable, "stream_seq": delivery.stream_sequence, "delivery": delivery.number}
        if delivery.number > 1:
            REDELIVERIES.labels(settings.durable).inc()
        try:
            outcome = await self._handle_keeping_message(message, delivery)
        except asyncio.CancelledError:
            # Shutting down: without this the message would wait out the whole ack wait.
            await _settle(message.nak(), "nak", fields)
            raise
        except TimeoutError:
            log.error("consumer.work_timed_out", extra={**fields, "limit_seconds": settings.max_work_seconds})
            outcome = retry(f"work took longer than {settings.max_work_seconds:g} s")
        except Exception as error:  # handlers handle their own; this is a last guard
            log.exception("consumer.handler_crashed", extra={**fields, "error": repr(error)})
            outcome = retry(repr(error))
        await self._answer(message, delivery, outcome, fields)

    async def _handle_keeping_message(self, message: Msg, delivery: Delivery) -> Outcome:
        heartbeat = asyncio.create_task(self._beat(message), name=f"{self._settings.durable}-heartbeat")
        try:
            async with asyncio.timeout(self._settings.max_work_seconds):
                return await self._handle_delivery(delivery)
        finally:
            # Stopped before the ack, nak or term that follows, whatever the outcome.
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _beat(self, message: Msg) -> None:
        """Tells JetStream every ack_wait / 3 that this message is still being worked on."""
        interval = self._settings.heartbeat_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(interval):
                    await message.in_progress()
            except Exception as error:
                # NATS away for a moment: the next beat may get through; if none does, the
                # message is redelivered and the handler's lease turns the copy away.
                log.warning(
                    "consumer.heartbeat_failed", extra={"consumer": self._settings.durable, "error": repr(error)}
                )

    async def _answer(self, message: Msg, delivery: Delivery, outcome: Outcome, fields: dict) -> None:
        fields = {**fields, "status": outcome.status}
        durable = self._settings.durable
        if outcome.verdict is Verdict.ACK:
            DELIVERIES.labels(durable, "ack").inc()
            log.info("consumer.message_done", extra=fields)
            await _settle(message.ack(), "ack", fields)
        elif outcome.verdict is Verdict.TERM:
            DELIVERIES.labels(durable, "term").inc()
            log.error("consumer.message_terminated", extra={**fields, "error": outcome.reason})
            await _settle(message.term(), "term", fields)
        elif delivery.final:
            # A nak, not a term: JetStream then announces the message as out of deliveries
            # (MAX_DELIVERIES advisory), which a dead-letter consumer can act on.
            DELIVERIES.labels(durable, "exhausted").inc()
            log.error("consumer.deliveries_exhausted", extra={**fields, "error": outcome.reason})
            await _settle(message.nak(), "nak", fields)
        else:
            DELIVERIES.labels(durable, "retry").inc()
            delay = max(outcome.delay_seconds or 0.0, self._settings.nak_delay(delivery.number))
            log.warning("consumer.message_retried", extra={**fields, "delay_seconds": delay, "error": outcome.reason})
            await _settle(message.nak(delay=delay), "nak", fields)


async def _settle(reply: Awaitable[None], kind: str, fields: dict | None = None) -> None:
    try:
        await reply
    except Exception as error:
        # Lost with the connection: the server redelivers after the ack wait, and the
        # handler's own bookkeeping makes that redelivery a no-op.
        log.warning("consumer.reply_failed", extra={**(fields or {}), "reply": kind, "error": repr(error)})


async def _hand_back(messages: list[Msg]) -> None:
    """Messages fetched while stopping go back at once, to whichever process asks next."""
    for message in messages:
        await _settle(message.nak(), "nak")


async def _unsubscribe_quietly(subscription: JetStreamContext.PullSubscription | None) -> None:
    if subscription is None:
        return
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()


async def _close_quietly(nc: Client) -> None:
    # Flush so the last acks and naks leave; drain() is not used because it waits for every
    # subscription queue to empty, which a pull subscription need never do.
    with contextlib.suppress(Exception):
        await nc.flush(timeout=2)
    with contextlib.suppress(Exception):
        await nc.close()

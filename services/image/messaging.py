"""The durable JetStream consumer of `story.created` that feeds the portrait pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from casefile.story.v1 import story_events_pb2
from services.image.domain import (
    DEFAULT_ACK_WAIT_SECONDS,
    Disposition,
    InvalidArgument,
    PortraitEvent,
    PortraitOutcome,
    heartbeat_interval,
    longest_hold_seconds,
    portrait_event,
)
from shared.nats import connect_nats_until_ready, ensure_pull_consumer, ensure_stream

log = logging.getLogger(__name__)

# Shared with the story service, which declares the same stream: identical settings, so
# neither ever "updates" it back and forth.
STREAM_NAME = "STORY_EVENTS"
STORY_CREATED_SUBJECT = "story.created"
STREAM_MAX_AGE_SECONDS = 7 * 24 * 3600
STREAM_DUPLICATE_WINDOW_SECONDS = 120
# One durable for every image process: JetStream spreads the messages among them.
DURABLE_NAME = "image-portraits"
CLIENT_NAME = "image-portraits"

PaintPortrait = Callable[[PortraitEvent, bool], Awaitable[PortraitOutcome]]


@dataclass(frozen=True)
class ConsumerSettings:
    nats_url: str
    concurrency: int
    max_deliver: int
    redelivery_backoff_seconds: tuple[float, ...]
    # Bounds how long heartbeats keep one message: a worker stuck past it lets go.
    attempt_budget_seconds: float
    # Short, because a live worker keeps its message with heartbeats (msg.in_progress)
    # every third of it: a crashed one loses its message within one ack wait.
    ack_wait_seconds: float = DEFAULT_ACK_WAIT_SECONDS
    # Also the longest stop() waits for a fetch under way; an idle pull request a second
    # costs the server next to nothing.
    fetch_timeout_seconds: float = 1.0
    retry_delay_seconds: float = 1.0
    shutdown_grace_seconds: float = 5.0

    @property
    def heartbeat_interval_seconds(self) -> float:
        return heartbeat_interval(self.ack_wait_seconds)

    @property
    def longest_hold_seconds(self) -> float:
        return longest_hold_seconds(self.attempt_budget_seconds)

    def nak_delay(self, delivery: int) -> float:
        """The wait before delivery number `delivery + 1`; the last entry repeats."""
        delays = self.redelivery_backoff_seconds
        return delays[min(max(delivery, 1), len(delays)) - 1]


def decode_story_created(data: bytes) -> PortraitEvent:
    """StoryCreated bytes -> PortraitEvent; DecodeError or InvalidArgument when unusable."""
    message = story_events_pb2.StoryCreated.FromString(data)
    return portrait_event(message.story_id, message.image_generation_prompt, message.portrait_attempt)


class PortraitConsumer:
    """Fetches story.created in batches and paints at most `concurrency` portraits at once.

    NATS being down at start-up, or going away later, only delays portraits: the loop logs
    and keeps trying, and unacknowledged messages come back after the ack wait.
    """

    def __init__(self, settings: ConsumerSettings, paint: PaintPortrait) -> None:
        self._settings = settings
        self._paint = paint
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        # The set bounds in-flight work (the consumer's max_ack_pending bounds it too) and
        # lets stop() cancel and await every portrait still being painted.
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._fetching = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="portrait-consumer")

    async def stop(self) -> None:
        """Stops fetching, lets work in flight finish for a moment, then cancels it and closes NATS."""
        self._stopping.set()
        await self._stop_fetching()
        cancelled = await self._finish_in_flight()
        if self._nc is not None:
            await _close_quietly(self._nc)
        log.info("portraits.consumer_stopped", extra={"cancelled": cancelled})

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
            settings.nats_url,
            name=CLIENT_NAME,
            stop=self._stopping,
            retry_delay=settings.retry_delay_seconds,
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
                log.warning("portraits.consumer_error", extra={"error": f"{type(error).__name__}: {error}"})
                await _unsubscribe_quietly(subscription)
                await asyncio.sleep(settings.retry_delay_seconds)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        settings = self._settings
        await ensure_stream(
            js,
            name=STREAM_NAME,
            subjects=[STORY_CREATED_SUBJECT],
            max_age_seconds=STREAM_MAX_AGE_SECONDS,
            duplicate_window_seconds=STREAM_DUPLICATE_WINDOW_SECONDS,
        )
        # No consumer-level backoff: the server would use its first entry as the ack wait
        # and redeliver a portrait still being painted. Delays come from nak(delay) instead.
        await ensure_pull_consumer(
            js,
            stream=STREAM_NAME,
            durable=DURABLE_NAME,
            filter_subject=STORY_CREATED_SUBJECT,
            ack_wait_seconds=settings.ack_wait_seconds,
            max_deliver=settings.max_deliver,
            backoff_seconds=None,
            max_ack_pending=settings.concurrency,
        )
        subscription = await js.pull_subscribe_bind(DURABLE_NAME, stream=STREAM_NAME)
        log.info("portraits.consumer_ready", extra={"stream": STREAM_NAME, "consumer": DURABLE_NAME})
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
        task = asyncio.create_task(self._handle(message), name="portrait")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _handle(self, message: Msg) -> None:
        delivery = message.metadata.num_delivered
        final_delivery = delivery >= self._settings.max_deliver
        try:
            event = decode_story_created(message.data)
        except (DecodeError, InvalidArgument) as error:
            log.error("portrait.event_undecodable", extra={"delivery": delivery, "error": str(error)})
            await _settle(message.term(), "term")
            return
        try:
            outcome = await self._paint_keeping_message(message, event, final_delivery)
        except asyncio.CancelledError:
            # Shutting down: without this the message would wait out the whole ack wait.
            await _settle(message.nak(), "nak", {"story_id": str(event.story_id)})
            raise
        except Exception as error:  # paint_portrait handles its own; this is a last guard
            log.exception(
                "portrait.handler_crashed", extra={"story_id": str(event.story_id), "error": str(error)}
            )
            outcome = PortraitOutcome(Disposition.RETRY, "RETRY", str(error))
        await self._answer(message, event, outcome, delivery, final_delivery)

    async def _paint_keeping_message(
        self, message: Msg, event: PortraitEvent, final_delivery: bool
    ) -> PortraitOutcome:
        heartbeat = asyncio.create_task(self._beat_until_cancelled(message, event), name="portrait-heartbeat")
        try:
            return await self._paint(event, final_delivery)
        finally:
            # Stopped before the ack, nak or term that follows, whatever the outcome.
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _beat_until_cancelled(self, message: Msg, event: PortraitEvent) -> None:
        """Tells JetStream every ack_wait / 3 that this message is still being painted."""
        interval = self._settings.heartbeat_interval_seconds
        held_for = self._settings.longest_hold_seconds
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + held_for
        while True:
            await asyncio.sleep(interval)
            if loop.time() >= give_up_at:
                log.warning(
                    "portrait.heartbeat_hold_limit", extra={"story_id": str(event.story_id), "held_seconds": held_for}
                )
                return
            await _heartbeat(message, event, timeout=interval)

    async def _answer(
        self,
        message: Msg,
        event: PortraitEvent,
        outcome: PortraitOutcome,
        delivery: int,
        final_delivery: bool,
    ) -> None:
        fields = {"story_id": str(event.story_id), "delivery": delivery, "status": outcome.status}
        if outcome.disposition is Disposition.ACK:
            log.info("portrait.event_done", extra=fields)
            await _settle(message.ack(), "ack", fields)
        elif final_delivery:
            # Only reached when even recording the failure was impossible (e.g. the
            # database is down); the server would drop the message now anyway.
            log.error("portrait.deliveries_exhausted", extra={**fields, "error": outcome.reason})
            await _settle(message.term(), "term", fields)
        else:
            delay = self._settings.nak_delay(delivery)
            log.warning(
                "portrait.event_retry",
                extra={**fields, "delay_seconds": delay, "error": outcome.reason},
            )
            await _settle(message.nak(delay=delay), "nak", fields)


async def _heartbeat(message: Msg, event: PortraitEvent, *, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await message.in_progress()
    except Exception as error:
        # NATS away for a moment: the next beat may get through; if none does, the message
        # is redelivered and the lease, still renewed, turns the copy away while we finish.
        log.warning("portrait.heartbeat_failed", extra={"story_id": str(event.story_id), "error": repr(error)})


async def _settle(reply: Awaitable[None], kind: str, fields: dict | None = None) -> None:
    try:
        await reply
    except Exception as error:
        # Lost with the connection: the server redelivers after the ack wait, and the
        # portrait row makes that redelivery a no-op.
        log.warning("portrait.reply_failed", extra={**(fields or {}), "reply": kind, "error": repr(error)})


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

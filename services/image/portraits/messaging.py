"""The portrait pipeline on NATS: story.created consumed through the shared durable
consumer, and the dead letters of that consumer, which end abandoned portraits.

Every image process runs both; JetStream spreads the messages among them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from casefile.story.v1 import story_events_pb2
from services.image.durable_consumer import ConsumerSettings, Delivery, DurableConsumer, Outcome, ack, retry, term
from services.image.portraits.domain import PortraitEvent, UnusableEvent, portrait_event
from services.image.portraits.metrics import PORTRAIT_DELIVERIES
from shared.config import NatsSettings
from shared.nats import connect_nats_until_ready
from shared.streams import PORTRAIT_DEAD_LETTERS, PORTRAITS_DURABLE, STORY_CREATED_SUBJECT, STORY_EVENTS

log = logging.getLogger(__name__)

DEAD_LETTERS_DURABLE = "image-portrait-dead-letters"
# Ending an abandoned portrait must eventually succeed, so its deliveries are unlimited;
# these delays space them out while the database or the story service is away.
DEAD_LETTER_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

Paint = Callable[[PortraitEvent, int, bool], Awaitable[Outcome]]
EndAbandoned = Callable[[PortraitEvent], Awaitable[Outcome]]


@dataclass(frozen=True)
class PortraitConsumerSettings:
    nats: NatsSettings
    concurrency: int
    max_deliver: int
    max_ack_pending: int
    redelivery_backoff_seconds: tuple[float, ...]
    ack_wait_seconds: float
    max_work_seconds: float
    stream_replicas: int = 1
    shutdown_grace_seconds: float = 5.0


def decode_story_created(data: bytes) -> PortraitEvent:
    """StoryCreated bytes -> PortraitEvent; DecodeError or UnusableEvent when unusable."""
    message = story_events_pb2.StoryCreated.FromString(data)
    return portrait_event(message.story_id, message.portrait_attempt)


def portrait_consumer(settings: PortraitConsumerSettings, paint: Paint) -> DurableConsumer:
    """The consumer of story.created shared by every image process."""

    async def handle(delivery: Delivery) -> Outcome:
        try:
            event = decode_story_created(delivery.data)
        except (DecodeError, UnusableEvent) as error:
            log.error("portrait.event_rejected", extra={"delivery": delivery.number, "error": str(error)})
            outcome = term(str(error))
        else:
            outcome = await paint(event, delivery.number, delivery.final)
        PORTRAIT_DELIVERIES.labels(outcome.status).inc()
        return outcome

    return DurableConsumer(
        ConsumerSettings(
            nats=settings.nats,
            stream=STORY_EVENTS,
            # Declared first, so the advisories of this consumer are kept from the start.
            other_streams=(PORTRAIT_DEAD_LETTERS,),
            durable=PORTRAITS_DURABLE,
            filter_subject=STORY_CREATED_SUBJECT,
            concurrency=settings.concurrency,
            max_deliver=settings.max_deliver,
            max_ack_pending=settings.max_ack_pending,
            redelivery_backoff_seconds=settings.redelivery_backoff_seconds,
            ack_wait_seconds=settings.ack_wait_seconds,
            max_work_seconds=settings.max_work_seconds,
            stream_replicas=settings.stream_replicas,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            client_name="image-portraits",
        ),
        handle,
    )


class DeadLetters:
    """Consumes JetStream's MAX_DELIVERIES advisories of the portraits consumer.

    An advisory names the stream sequence of the message that ran out of deliveries; the
    message itself (still in STORY_EVENTS) says which story and attempt it was.
    """

    def __init__(self, settings: PortraitConsumerSettings, end_abandoned: EndAbandoned) -> None:
        self._nats_settings = settings.nats
        self._end_abandoned = end_abandoned
        self._reader: Client | None = None
        self.consumer = DurableConsumer(
            ConsumerSettings(
                nats=settings.nats,
                stream=PORTRAIT_DEAD_LETTERS,
                durable=DEAD_LETTERS_DURABLE,
                filter_subject=PORTRAIT_DEAD_LETTERS.subjects[0],
                concurrency=2,
                max_deliver=None,
                max_ack_pending=1000,
                redelivery_backoff_seconds=DEAD_LETTER_BACKOFF_SECONDS,
                ack_wait_seconds=settings.ack_wait_seconds,
                max_work_seconds=settings.max_work_seconds,
                stream_replicas=settings.stream_replicas,
                shutdown_grace_seconds=settings.shutdown_grace_seconds,
                client_name="image-portrait-dead-letters",
            ),
            self._handle,
        )

    def start(self) -> None:
        self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        if self._reader is not None:
            await self._reader.close()

    async def _handle(self, delivery: Delivery) -> Outcome:
        try:
            advisory = json.loads(delivery.data)
            sequence = int(advisory["stream_seq"])
        except (ValueError, KeyError, TypeError) as error:
            return term(f"not a max-deliveries advisory: {error!r}")
        try:
            data = await self._original_message(sequence)
        except NotFoundError:
            log.error("portrait.dead_letter_lost", extra={"stream_seq": sequence})
            return ack("ORIGINAL_GONE")
        except Exception as error:  # noqa: BLE001 - NATS away: a later delivery reads it
            return retry(f"reading stream message {sequence}: {error!r}")
        try:
            event = decode_story_created(data)
        except (DecodeError, UnusableEvent):
            return ack("UNDECODABLE")  # the portraits consumer terminated it already
        return await self._end_abandoned(event)

    async def _original_message(self, sequence: int) -> bytes:
        if self._reader is None or self._reader.is_closed:
            self._reader = await connect_nats_until_ready(self._nats_settings, name="image-dead-letter-reader")
        message = await self._reader.jetstream().get_msg(STORY_EVENTS.name, sequence)
        return message.data

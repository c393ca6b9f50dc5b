"""The story service on NATS: its outbox, relayed to JetStream by shared.outbox."""

from __future__ import annotations

import logging

import asyncpg
from nats.js import JetStreamContext

from services.story import storage
from shared.config import NatsSettings, Secret
from shared.nats import ensure_stream
from shared.outbox import OutboxRelay, OutboxTable, RelaySettings
from shared.streams import STORY_EVENTS

log = logging.getLogger(__name__)

# Each publish's log lines name the story and the portrait attempt it starts.
STORY_OUTBOX = OutboxTable(
    table="story.outbox", channel="story_outbox", log_columns={"story_id": "story_id", "attempt": "portrait_attempt"}
)


def story_outbox_relay(
    pool: asyncpg.Pool,
    dsn: Secret[str],
    nats: NatsSettings,
    *,
    settings: RelaySettings,
    stream_replicas: int,
) -> OutboxRelay:
    """The relay of story.outbox, which declares STORY_EVENTS before its first publish."""

    async def prepare(js: JetStreamContext) -> None:
        await ensure_stream(js, STORY_EVENTS, replicas=stream_replicas)

    return OutboxRelay(pool, dsn, nats, STORY_OUTBOX, client_name="story-outbox", settings=settings, prepare=prepare)


async def fill_missing_payloads(pool: asyncpg.Pool) -> None:
    """Events queued by a version that did not store payloads get them before relaying."""
    async with pool.acquire() as conn:
        filled = await storage.fill_missing_payloads(conn)
    if filled:
        log.info("outbox.payloads_filled", extra={"rows": filled})

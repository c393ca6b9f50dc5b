"""The outbox relay: publishes committed `story.created` rows to JetStream.

A story commits together with its outbox row; this loop publishes the row later with a
`Nats-Msg-Id`, so NATS being down only delays portraits, and a crash between publishing
and marking the row published cannot create a second event (JetStream drops the
duplicate within its duplicate window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

import asyncpg
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from casefile.story.v1 import story_events_pb2
from services.story import storage
from shared.nats import connect_nats_until_ready, ensure_stream, msg_id_headers

log = logging.getLogger(__name__)

# Both the story (publisher) and the image service (consumer) declare this stream with
# exactly these settings, so whichever starts first creates it and neither fights the other.
STREAM_NAME = "STORY_EVENTS"
STREAM_SUBJECTS = ["story.created"]
STREAM_MAX_AGE_SECONDS = 7 * 24 * 3600
STREAM_DUPLICATE_WINDOW_SECONDS = 120


def encode_story_created(row: asyncpg.Record) -> bytes:
    create_time = Timestamp()
    create_time.FromDatetime(row["create_time"])
    return story_events_pb2.StoryCreated(
        story_id=row["story_id"],
        user_id=row["user_id"],
        image_generation_prompt=row["image_generation_prompt"],
        create_time=create_time,
        portrait_attempt=row["portrait_attempt"],
    ).SerializeToString()


class OutboxRelay:
    """Publishes unpublished outbox rows; several story processes may run one each."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nats_url: str,
        *,
        poll_interval: float = 1.0,
        batch_size: int = 100,
        publish_timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self._nats_url = nats_url
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._publish_timeout = publish_timeout
        self._wake = asyncio.Event()
        self._nats: NATS | None = None

    def kick(self) -> None:
        """Called after a commit so the new event goes out now, not at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        if self._nats is None or self._nats.is_closed:
            self._nats = await connect_nats_until_ready(self._nats_url, name="story-outbox")
        js = self._nats.jetstream()
        await self._declare_stream(js)
        while True:
            _honour_swallowed_cancellation()
            # Cleared before the batch, so a kick that lands while publishing is not lost.
            self._wake.clear()
            try:
                published, failed = await self.publish_batch(js)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                # The database is away for a moment: the rows are still there, try again.
                log.error("outbox.batch_failed", extra={"error": repr(error)})
                published, failed = 0, True
            if published == self._batch_size and not failed:
                continue
            await self._sleep_until_kicked(self._poll_interval * (5 if failed else 1))

    async def close(self) -> None:
        # close, not drain: every publish already waited for its ack, so nothing is pending,
        # and drain could wait out its timeout on a NATS that is down.
        if self._nats is not None and not self._nats.is_closed:
            await self._nats.close()

    async def _declare_stream(self, js: JetStreamContext) -> None:
        while True:
            try:
                await ensure_stream(
                    js,
                    name=STREAM_NAME,
                    subjects=STREAM_SUBJECTS,
                    max_age_seconds=STREAM_MAX_AGE_SECONDS,
                    duplicate_window_seconds=STREAM_DUPLICATE_WINDOW_SECONDS,
                )
                return
            except Exception as error:  # noqa: BLE001 - any failure here means "NATS not ready yet"
                log.warning("outbox.stream_not_ready", extra={"stream": STREAM_NAME, "error": repr(error)})
                await asyncio.sleep(self._poll_interval)

    async def publish_batch(self, js: JetStreamContext) -> tuple[int, bool]:
        """Publishes up to one batch in order; stops at the first failure (order matters less
        than not hammering a NATS that is down). Returns (published, whether one failed)."""
        published = 0
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                for row in await storage.claim_unpublished(conn, self._batch_size):
                    if not await self._publish_one(conn, js, row):
                        return published, True
                    published += 1
        return published, False

    async def _publish_one(self, conn: asyncpg.Connection, js: JetStreamContext, row: asyncpg.Record) -> bool:
        ids = {"story_id": row["story_id"], "msg_id": row["msg_id"], "outbox_id": row["outbox_id"]}
        try:
            ack = await js.publish(
                row["subject"],
                encode_story_created(row),
                timeout=self._publish_timeout,
                headers=msg_id_headers(row["msg_id"]),
            )
        except Exception as error:  # noqa: BLE001 - every publish failure is retried later
            log.warning("outbox.publish_failed", extra={**ids, "error": repr(error)})
            await storage.record_publish_failure(conn, row["outbox_id"], repr(error))
            return False
        await storage.mark_published(conn, row["outbox_id"])
        log.info(
            "outbox.published",
            extra={**ids, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate), "lag_ms": _lag_ms(row["create_time"])},
        )
        return True

    async def _sleep_until_kicked(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as the event fires, and the relay would then never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()


def _honour_swallowed_cancellation() -> None:
    """On Python 3.11, asyncio.wait_for (which nats-py uses for every request) returns the
    result instead of raising when a cancellation lands as the reply arrives; the relay
    would then loop on forever and shutdown would hang. The request is still on record."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _lag_ms(create_time: datetime) -> int:
    return int((datetime.now(create_time.tzinfo) - create_time).total_seconds() * 1000)

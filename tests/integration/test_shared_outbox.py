"""shared.outbox's relay on a real PostgreSQL (the story service's outbox table) and NATS.

Rows are inserted straight into story.outbox, as another story process would commit them;
a core NATS subscription sees every publish (duplicates included), the stream what
JetStream kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid

import asyncpg
import grpc
import nats
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story.config import Config
from services.story.main import build
from services.story.messaging import STORY_OUTBOX
from shared.auth import bearer_metadata
from shared.nats import ensure_stream
from shared.outbox import OutboxRelay, OutboxRow, RelaySettings
from shared.streams import STORY_EVENTS

pytestmark = pytest.mark.timeout(60)

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"


async def insert_events(conn: asyncpg.Connection, count: int) -> list[str]:
    """`count` stories and their outbox rows in one transaction; their message ids."""
    msg_ids = []
    async with conn.transaction():
        for _ in range(count):
            story_id = uuid.uuid4()
            await conn.execute(
                """INSERT INTO story.stories (story_id, user_id, title, patient, chapters, image_generation_prompt)
                   VALUES ($1, 'u1', 't', '{"name":"n","age":1,"diagnosis":"d","appearance":"a"}',
                           '[{"title":"c","text":"x"}]', 'p')""",
                story_id,
            )
            msg_id = f"story.created:{story_id}:1"
            await conn.execute(
                """INSERT INTO story.outbox (story_id, portrait_attempt, subject, msg_id, payload)
                   VALUES ($1, 1, 'story.created', $2, $3)""",
                story_id,
                msg_id,
                msg_id.encode(),
            )
            msg_ids.append(msg_id)
    return msg_ids


@pytest.fixture
async def db(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def pool(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def published(nats_server):
    """Every message id published on story.created, in order, duplicates included."""
    nc = await nats.connect(nats_server.url)
    seen: list[str] = []

    async def record(message) -> None:
        seen.append(message.headers["Nats-Msg-Id"])

    await nc.subscribe("story.created", cb=record)
    await ensure_stream(nc.jetstream(), STORY_EVENTS)
    yield seen
    await nc.close()


async def until(check, timeout: float = 15.0, what: str = "condition"):
    """Polls `check` (sync, or returning an awaitable) until truthy; a hang guard bounds it."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


@contextlib.asynccontextmanager
async def relays(pool, database_url, nats_server, count: int = 1, **settings):
    running = [
        OutboxRelay(pool, database_url, nats_server.url, STORY_OUTBOX, client_name=f"relay-{n}",
                    settings=RelaySettings(**settings))
        for n in range(count)
    ]
    tasks = [asyncio.create_task(relay.run()) for relay in running]
    try:
        yield running
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for relay in running:
            await relay.close()


async def unpublished(db) -> int:
    return await db.fetchval("SELECT count(*) FROM story.outbox WHERE published_at IS NULL")


async def test_a_commit_anywhere_wakes_the_relay_at_once(pool, database_url, nats_server, published, db):
    # A poll of a minute: only the NOTIFY of the commit can bring the event out in time.
    async with relays(pool, database_url, nats_server, poll_interval_seconds=60) as [relay]:
        await until(lambda: relay._listener is not None, what="the relay listening")
        [msg_id] = await insert_events(db, 1)

        await until(lambda: published, timeout=5, what="the publish woken by NOTIFY")
        assert published == [msg_id]
        async with asyncio.timeout(5):
            while await unpublished(db):
                await asyncio.sleep(0.02)


async def test_the_relay_holds_no_lock_and_no_transaction_while_publishing(
    pool, database_url, nats_server, published, db
):
    async with relays(pool, database_url, nats_server, publish_timeout_seconds=5) as _:
        await insert_events(db, 1)
        await until(lambda: published, what="the relay connected and publishing")
        await asyncio.to_thread(nats_server.stop)  # every publish now waits out its timeout
        await insert_events(db, 3)
        await until(
            lambda: db.fetchval("SELECT count(*) FROM story.outbox WHERE claimed_until IS NOT NULL"), what="the claim"
        )
        # Mid-publish: the rows are claimed, yet anybody can lock them at once, and no
        # session of the relay sits in an open transaction.
        async with db.transaction():
            await db.execute("SET LOCAL lock_timeout = '100ms'")
            locked = await db.fetch("SELECT outbox_id FROM story.outbox FOR UPDATE NOWAIT")
        assert len(locked) == 4
        idle_in_transaction = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
        )
        assert idle_in_transaction == 0
        await asyncio.to_thread(nats_server.start)
        async with asyncio.timeout(30):
            while await unpublished(db):
                await asyncio.sleep(0.05)
    assert sorted(set(published)) == sorted(published)


async def test_a_backlog_goes_out_in_batches(pool, database_url, nats_server, published, db, caplog):
    caplog.set_level(logging.INFO, logger="shared.outbox")
    msg_ids = await insert_events(db, 250)
    async with relays(pool, database_url, nats_server, batch_size=100):
        async with asyncio.timeout(30):
            while await unpublished(db):
                await asyncio.sleep(0.05)
    rounds = [record for record in caplog.records if record.getMessage() == "outbox.batch_published"]
    assert sorted(published) == sorted(msg_ids)
    assert [record.claimed for record in rounds] == [100, 100, 50]


async def test_several_relays_share_the_rows_and_publish_each_once(pool, database_url, nats_server, published, db):
    msg_ids = await insert_events(db, 400)
    async with relays(pool, database_url, nats_server, count=3, batch_size=20) as running:
        async with asyncio.timeout(30):
            # A relay counts a batch once its mark has returned, a moment after the rows read
            # as published here: leaving before then stopped it short of counting (380 of 400).
            while await unpublished(db) or sum(relay.published_total for relay in running) < len(msg_ids):
                await asyncio.sleep(0.05)
    assert sorted(published) == sorted(msg_ids), "each row published exactly once"
    assert sum(relay.published_total for relay in running) == 400
    assert sum(relay.published_total > 0 for relay in running) >= 2, "the relays shared the work"


async def test_a_relay_that_dies_between_publish_and_mark_republishes_with_the_same_id(
    pool, database_url, nats_server, published, db
):
    # The mark step fails, exactly as if the relay had crashed after the publish.
    await db.execute(
        """CREATE FUNCTION story.refuse_mark() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'crashed before marking'; END $$;
           CREATE TRIGGER refuse_mark BEFORE UPDATE ON story.outbox FOR EACH ROW
             WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION story.refuse_mark();"""
    )
    [msg_id] = await insert_events(db, 1)
    async with relays(pool, database_url, nats_server, claim_seconds=0.3, poll_interval_seconds=0.2):
        await until(lambda: len(published) >= 2, what="the claim expiring and the row published again")
        await db.execute("DROP TRIGGER refuse_mark ON story.outbox")
        async with asyncio.timeout(10):
            while await unpublished(db):
                await asyncio.sleep(0.05)
    assert set(published) == {msg_id}
    nc = await nats.connect(nats_server.url)
    try:
        assert (await nc.jetstream().stream_info(STORY_EVENTS.name)).state.messages == 1
    finally:
        await nc.close()


async def test_published_rows_are_pruned_after_the_retention(pool, database_url, nats_server, published, db):
    await insert_events(db, 5)
    async with relays(pool, database_url, nats_server, retention_seconds=0.5, prune_interval_seconds=0.1,
                      poll_interval_seconds=0.1):
        async with asyncio.timeout(15):
            while await db.fetchval("SELECT count(*) FROM story.outbox"):
                await asyncio.sleep(0.05)
    assert len(published) == 5


@contextlib.asynccontextmanager
async def story_service(database_url, nats_server):
    """A story service in this process whose poll lies beyond any test: only its own
    handoff (or a NOTIFY) can publish in time. Yields its stub."""
    config = Config.from_env(
        {"STORY_ADDR": "127.0.0.1:0", "DATABASE_URL": database_url, "NATS_URL": nats_server.url,
         "AUTH_TOKENS": TOKENS, "OUTBOX_POLL_INTERVAL_SECONDS": "60"}
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        server = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield story_service_pb2_grpc.StoryServiceStub(channel)


async def test_the_story_service_relays_through_it_and_is_woken_by_its_own_commits(database_url, nats_server, published):
    async with story_service(database_url, nats_server) as stub:
        story = (await stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=bearer_metadata("t-gateway"))).story
        await until(lambda: published, timeout=5, what="the event")
    assert published == [f"story.created:{story.story_id}:1"]


# ---------------------------------------------------------------------------- the handoff


async def insert_claimed_event(conn: asyncpg.Connection, claim_seconds: float) -> OutboxRow:
    """A story and its row inserted already claimed, as the story service inserts what it hands off."""
    story_id = uuid.uuid4()
    msg_id = f"story.created:{story_id}:1"
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO story.stories (story_id, user_id, title, patient, chapters, image_generation_prompt)
               VALUES ($1, 'u1', 't', '{"name":"n","age":1,"diagnosis":"d","appearance":"a"}',
                       '[{"title":"c","text":"x"}]', 'p')""",
            story_id,
        )
        row = await conn.fetchrow(
            """INSERT INTO story.outbox (story_id, portrait_attempt, subject, msg_id, payload, claimed_until)
               VALUES ($1, 1, 'story.created', $2, $3, now() + make_interval(secs => $4::float8))
               RETURNING outbox_id, subject, msg_id, payload, created_at""",
            story_id, msg_id, msg_id.encode(), claim_seconds,
        )  # fmt: skip
    return OutboxRow(**dict(row), log_ids={"story_id": str(story_id), "attempt": 1})


async def published_at(conn: asyncpg.Connection, row: OutboxRow):
    return await conn.fetchval("SELECT published_at FROM story.outbox WHERE outbox_id = $1", row.outbox_id)


async def stream_messages(nats_server) -> int:
    nc = await nats.connect(nats_server.url)
    try:
        return (await nc.jetstream().stream_info(STORY_EVENTS.name)).state.messages
    finally:
        await nc.close()


async def test_a_handed_off_row_is_published_and_marked_without_waking_any_relay(
    pool, database_url, nats_server, published, db
):
    # A poll far beyond the test: only the handoff can publish the row in time, and the
    # claimed insert wakes no relay (migration 0004), so nothing claims it a second time.
    async with relays(pool, database_url, nats_server, poll_interval_seconds=60) as (relay,):
        await until(lambda: relay._nats is not None and relay._nats.is_connected, what="the relay's connection")
        row = await insert_claimed_event(db, relay.claim_seconds)
        relay.hand_off(row)
        await until(lambda: published_at(db, row), timeout=5, what="the mark")
    assert published == [row.msg_id]
    assert await stream_messages(nats_server) == 1


async def test_a_handoff_that_nats_refuses_goes_back_to_the_relay_and_is_sent_once_nats_returns(
    pool, database_url, nats_server, published, db
):
    async with relays(pool, database_url, nats_server, poll_interval_seconds=0.2, publish_timeout_seconds=0.5) as (relay,):
        await until(lambda: relay._nats is not None and relay._nats.is_connected, what="the relay's connection")
        nats_server.stop()
        row = await insert_claimed_event(db, relay.claim_seconds)
        relay.hand_off(row)
        # The publish times out and the claim is given back with the reason: the relay's now.
        await until(lambda: db.fetchval("SELECT last_error IS NOT NULL AND claimed_until IS NULL FROM story.outbox "
                                        "WHERE outbox_id = $1", row.outbox_id), what="the claim given back")  # fmt: skip
        assert await published_at(db, row) is None
        nats_server.start()
        await until(lambda: published_at(db, row), timeout=20, what="the relay's publish")
    # nats-py may also flush the first attempt after reconnecting: JetStream keeps one copy.
    assert await stream_messages(nats_server) == 1


async def test_a_row_whose_process_died_before_handing_it_off_is_relayed_once_its_claim_expires(
    pool, database_url, nats_server, published, db
):
    # Committed and claimed, then nothing: the process died between its commit and its handoff.
    row = await insert_claimed_event(db, 1.0)
    async with relays(pool, database_url, nats_server, poll_interval_seconds=0.2):
        await asyncio.sleep(0.5)
        assert published == [], "a live claim keeps the row out of every relay's reach"
        await until(lambda: published_at(db, row), timeout=10, what="the relay's publish after the claim")
    assert published == [row.msg_id]


async def test_the_story_service_hands_its_events_off_claimed(database_url, nats_server, published, db):
    async with story_service(database_url, nats_server) as stub:
        stories = [
            (await stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=bearer_metadata("t-gateway"))).story
            for _ in range(3)
        ]
        await until(lambda: len(published) == 3, timeout=5, what="the events")
        # The mark follows the publish's ack: wait for it before reading the rows.
        await until(lambda: db.fetchval("SELECT count(*) = 3 FROM story.outbox WHERE published_at IS NOT NULL"),
                    timeout=5, what="the marks")  # fmt: skip
        rows = await db.fetch("SELECT published_at, attempts FROM story.outbox ORDER BY outbox_id")
    assert published == [f"story.created:{story.story_id}:1" for story in stories]
    # Published and marked by the handoff: no relay round ever claimed them (attempts counts claims).
    assert all(row["published_at"] is not None and row["attempts"] == 0 for row in rows)

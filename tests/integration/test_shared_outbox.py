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
from shared.outbox import OutboxRelay, RelaySettings
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
            while await unpublished(db):
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


async def test_the_story_service_relays_through_it_and_is_woken_by_its_own_commits(database_url, nats_server, published):
    config = Config.from_env(
        {
            "STORY_ADDR": "127.0.0.1:0",
            "DATABASE_URL": database_url,
            "NATS_URL": nats_server.url,
            "AUTH_TOKENS": TOKENS,
            "OUTBOX_POLL_INTERVAL_SECONDS": "60",
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        server = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        stub = story_service_pb2_grpc.StoryServiceStub(channel)
        story = (await stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=bearer_metadata("t-gateway"))).story
        await until(lambda: published, timeout=5, what="the event")
    assert published == [f"story.created:{story.story_id}:1"]

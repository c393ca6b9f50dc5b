"""GetStory's coalesced reads (shared/coalescing.py) on a real PostgreSQL:
callers that meet share one SELECT, and each still gets its own answer or its own error."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from services.story import domain, storage
from shared.coalescing import Coalescer
from services.story.handlers import content_from_proto
from shared.db import create_pool
from tests.case_files import case_file


@pytest.fixture
async def pool(database_url):
    pool = await create_pool(database_url, max_size=2, application_name="test-story-reads", reset_session_state=False)
    yield pool
    await pool.close()


async def new_story(pool: asyncpg.Pool, user_id: str = "u-reads") -> domain.Story:
    content = content_from_proto(pb.CreateStoryRequest(content=case_file()))
    return await domain.create_story(pool, user_id=user_id, content=content, request_id="")


def counted_reads(pool: asyncpg.Pool) -> tuple[Coalescer[str, domain.Story], list[list[str]]]:
    """The story service's reads, recording the ids each SELECT was sent for."""
    batches: list[list[str]] = []

    async def fetch(story_ids: list[str]) -> dict[str, domain.Story]:
        batches.append(story_ids)
        async with pool.acquire() as conn:
            return await storage.get_stories(conn, story_ids)

    return Coalescer(fetch), batches


async def test_concurrent_gets_of_different_stories_share_one_select(pool):
    stories = [await new_story(pool, f"u-{n}") for n in range(5)]
    reads, batches = counted_reads(pool)

    got = await asyncio.gather(*(domain.get_story(reads, story.story_id) for story in stories))

    assert [story.story_id for story in got] == [story.story_id for story in stories]
    assert [story.user_id for story in got] == [f"u-{n}" for n in range(5)]
    assert [sorted(batch) for batch in batches] == [sorted(story.story_id for story in stories)]


async def test_concurrent_gets_of_one_story_ask_for_it_once(pool):
    story = await new_story(pool)
    reads, batches = counted_reads(pool)

    got = await asyncio.gather(*(domain.get_story(reads, story.story_id) for _ in range(4)))

    assert got == [got[0]] * 4 and got[0].story_id == story.story_id
    assert batches == [[story.story_id]]


async def test_a_missing_story_is_not_found_for_its_caller_only(pool):
    present = [await new_story(pool) for _ in range(2)]
    missing = str(uuid.uuid4())
    reads = domain.story_reads(pool)

    first, absent, second = await asyncio.gather(
        domain.get_story(reads, present[0].story_id),
        domain.get_story(reads, missing),
        domain.get_story(reads, present[1].story_id),
        return_exceptions=True,
    )

    assert (first.story_id, second.story_id) == (present[0].story_id, present[1].story_id)
    assert isinstance(absent, domain.StoryNotFound) and absent.metadata == {"story_id": missing}


async def test_a_database_error_reaches_every_caller_of_the_select(pool, database_url):
    stories = [await new_story(pool) for _ in range(3)]
    conn = await asyncpg.connect(database_url)
    try:
        # A real error from PostgreSQL: the SELECT names a table that is no longer there.
        await conn.execute("ALTER TABLE story.stories RENAME TO stories_gone")
        reads = domain.story_reads(pool)
        outcomes = await asyncio.gather(
            *(domain.get_story(reads, story.story_id) for story in stories), return_exceptions=True
        )
        assert all(isinstance(outcome, asyncpg.UndefinedTableError) for outcome in outcomes), outcomes

        # The next callers get a SELECT of their own, which answers once the table is back.
        await conn.execute("ALTER TABLE story.stories_gone RENAME TO stories")
        again = await asyncio.gather(*(domain.get_story(reads, story.story_id) for story in stories))
        assert [story.story_id for story in again] == [story.story_id for story in stories]
    finally:
        await conn.close()


async def test_callers_that_come_while_a_select_is_out_wait_for_the_next_one(pool):
    """No caller joins a SELECT already sent: it would read a state older than its call."""
    stories = [await new_story(pool) for _ in range(3)]
    sent = asyncio.Event()
    release = asyncio.Event()
    batches: list[list[str]] = []

    async def fetch(story_ids: list[str]) -> dict[str, domain.Story]:
        batches.append(story_ids)
        if len(batches) == 1:
            sent.set()
            await release.wait()
        async with pool.acquire() as conn:
            return await storage.get_stories(conn, story_ids)

    reads = Coalescer(fetch)
    first = asyncio.ensure_future(domain.get_story(reads, stories[0].story_id))
    await sent.wait()
    later = [asyncio.ensure_future(domain.get_story(reads, story.story_id)) for story in stories[1:]]
    await asyncio.sleep(0.05)
    assert len(batches) == 1  # the later callers wait while the first SELECT is out
    release.set()

    assert (await first).story_id == stories[0].story_id
    assert [(await call).story_id for call in later] == [story.story_id for story in stories[1:]]
    assert batches == [[stories[0].story_id], [story.story_id for story in stories[1:]]]


async def test_a_caller_that_gives_up_leaves_the_others_answered(pool):
    stories = [await new_story(pool) for _ in range(2)]
    reads = domain.story_reads(pool)
    gives_up = asyncio.ensure_future(domain.get_story(reads, stories[0].story_id))
    stays = asyncio.ensure_future(domain.get_story(reads, stories[1].story_id))
    await asyncio.sleep(0)
    gives_up.cancel()

    assert (await stays).story_id == stories[1].story_id
    with pytest.raises(asyncio.CancelledError):
        await gives_up


async def test_an_unchanged_row_gives_the_same_story_and_a_changed_one_a_new_story(pool):
    story = await new_story(pool)
    decoded = storage.DecodedStories()
    async with pool.acquire() as conn:
        first = (await storage.get_stories(conn, [story.story_id], decoded))[story.story_id]
        again = (await storage.get_stories(conn, [story.story_id, str(uuid.uuid4())], decoded))[story.story_id]
    assert again is first  # read again, decoded once

    await domain.set_story_image(pool, story_id=story.story_id, storage_id="portraits/p.png", attempt=1)
    async with pool.acquire() as conn:
        changed = (await storage.get_stories(conn, [story.story_id], decoded))[story.story_id]
    assert changed is not first
    assert (changed.storage_id, changed.portrait_status) == ("portraits/p.png", domain.PortraitStatus.READY)
    assert (first.storage_id, first.portrait_status) == ("", domain.PortraitStatus.PENDING)


async def test_decoded_stories_keep_only_the_latest_read(pool):
    stories = [await new_story(pool, f"u-keep-{n}") for n in range(3)]
    decoded = storage.DecodedStories(max_stories=2)
    async with pool.acquire() as conn:
        first = await storage.get_stories(conn, [stories[0].story_id], decoded)
        await storage.get_stories(conn, [s.story_id for s in stories[1:]], decoded)
        again = await storage.get_stories(conn, [stories[0].story_id], decoded)
    # The oldest was dropped to make room, so it was decoded anew; the answer is the same.
    assert again[stories[0].story_id] is not first[stories[0].story_id]
    assert again[stories[0].story_id] == first[stories[0].story_id]

"""WatchStory at scale: one database listener per story process, fanned out in process."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import grpc
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story.config import Config
from services.story.main import build
from shared.auth import bearer_metadata
from shared.grpc_errors import details_of
from tests.case_files import case_file

pytestmark = pytest.mark.timeout(90)

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
GATEWAY = bearer_metadata("t-gateway")
IMAGE = bearer_metadata("t-image")
WATCHERS = 1000


def content() -> pb.StoryContent:
    return case_file(image_generation_prompt="a pale woman")


@contextlib.asynccontextmanager
async def story_service(database_url, nats_server, **settings: str):
    env = {
        "STORY_ADDR": "127.0.0.1:0",
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
        "AUTH_TOKENS": TOKENS,
        **settings,
    }
    async with contextlib.AsyncExitStack() as stack:
        server = await build(Config.from_env(env), stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield story_service_pb2_grpc.StoryServiceStub(channel)


async def create(story) -> pb.Story:
    return (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content()), metadata=GATEWAY)).story


async def listeners(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'casefile-story-watch'"
        )
    finally:
        await conn.close()


async def test_a_thousand_watchers_get_ready_from_one_listener(database_url, nats_server):
    async with story_service(database_url, nats_server) as story:
        created = await create(story)
        first_seen = asyncio.Event()
        seen_first = 0
        statuses: list[list[int]] = []

        async def watch() -> None:
            nonlocal seen_first
            mine: list[int] = []
            statuses.append(mine)
            async for response in story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY):
                mine.append(response.story.portrait_status)
                if len(mine) == 1:
                    seen_first += 1
                    if seen_first == WATCHERS:
                        first_seen.set()

        watchers = [asyncio.create_task(watch()) for _ in range(WATCHERS)]
        async with asyncio.timeout(60):
            await first_seen.wait()
        assert await listeners(database_url) == 1

        changed_at = asyncio.get_running_loop().time()
        await story.SetStoryImage(
            pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/x/1.png", attempt=1), metadata=IMAGE
        )
        async with asyncio.timeout(30):  # a hang guard; the figure is logged below
            await asyncio.gather(*watchers)
        spread = asyncio.get_running_loop().time() - changed_at

    assert all(mine == [pb.PORTRAIT_STATUS_PENDING, pb.PORTRAIT_STATUS_READY] for mine in statuses)
    print(f"{WATCHERS} watchers had READY {spread:.3f} s after the change")


async def test_watchers_beyond_the_bound_are_resource_exhausted(database_url, nats_server):
    async with story_service(database_url, nats_server, STORY_MAX_WATCHERS="2") as story:
        created = await create(story)
        streams = [story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY) for _ in range(2)]
        for stream in streams:
            await stream.read()  # the current state: both are watching now

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY):
                pass
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details_of(raised.value).reason == "TOO_MANY_WATCHERS"
        assert details_of(raised.value).retry_after_seconds is not None

        streams[0].cancel()
        async with asyncio.timeout(10):
            while True:  # the freed slot is usable again
                third = story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY)
                try:
                    await third.read()
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.05)
        third.cancel()
        streams[1].cancel()


async def test_a_stream_ends_with_the_current_state_after_its_maximum_duration(database_url, nats_server):
    async with story_service(database_url, nats_server, WATCH_MAX_SECONDS="0.5") as story:
        created = await create(story)
        async with asyncio.timeout(10):
            seen = [r.story async for r in story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY)]
    # Still PENDING, yet the stream ended cleanly (status OK) with the current state.
    assert [s.portrait_status for s in seen] == [pb.PORTRAIT_STATUS_PENDING]


async def test_a_change_made_by_another_process_reaches_the_watcher(database_url, nats_server):
    async with (
        story_service(database_url, nats_server) as watched,
        story_service(database_url, nats_server) as other,
    ):
        created = await create(watched)
        stream = watched.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY)
        assert (await stream.read()).story.portrait_status == pb.PORTRAIT_STATUS_PENDING

        await other.SetPortraitStatus(
            pb.SetPortraitStatusRequest(story_id=created.story_id, status=pb.PORTRAIT_STATUS_FAILED, reason="x", attempt=1),
            metadata=IMAGE,
        )
        async with asyncio.timeout(10):
            changed = await stream.read()
        assert changed.story.portrait_status == pb.PORTRAIT_STATUS_FAILED

"""The story service through its real gRPC server, on a real PostgreSQL and NATS JetStream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json

import asyncpg
import grpc
import nats
import pytest

from casefile.story.v1 import story_events_pb2
from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story.config import Config
from services.story.main import build
from shared.auth import bearer_metadata
from shared.grpc_errors import details_of
from tests.fakes.anthropic import SAMPLE_STORY, FakeAnthropic
from services.story.difficulty import story_typing_difficulty
from services.story.model import Chapter
from tests.case_files import case_file, chapters, patient
from tests.scrape import scrape

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
GATEWAY = bearer_metadata("t-gateway")
OUTBOX = "story.outbox"
IMAGE = bearer_metadata("t-image")
ADMIN = bearer_metadata("t-admin")


def story_config(database_url: str, nats_url: str) -> Config:
    return Config.from_env(
        {
            "STORY_ADDR": "127.0.0.1:0",
            "DATABASE_URL": database_url,
            "NATS_URL": nats_url,
            "AUTH_TOKENS": TOKENS,
            "OUTBOX_POLL_INTERVAL_SECONDS": "0.1",
        }
    )


@pytest.fixture
async def story(database_url, nats_server):
    async with contextlib.AsyncExitStack() as stack:
        server = await build(story_config(database_url, nats_server.url), stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield story_service_pb2_grpc.StoryServiceStub(channel)


@pytest.fixture
async def db(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def events(nats_server):
    """Reads what the relay published, straight from the JetStream stream."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()

    async def read(expected: int, timeout: float = 10.0) -> list:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                sub = await js.pull_subscribe("story.created", durable=None, stream="STORY_EVENTS")
                break
            except Exception:  # the stream appears once the relay has declared it
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        messages = []
        with contextlib.suppress(nats.errors.TimeoutError):
            while len(messages) < expected + 1:
                messages += await sub.fetch(expected + 1 - len(messages), timeout=1.0 if messages else timeout)
        await sub.unsubscribe()
        return messages

    yield read
    await nc.close()


valid_content = case_file


async def count_rows(db) -> tuple[int, int]:
    return await db.fetchval("SELECT count(*) FROM story.stories"), await db.fetchval("SELECT count(*) FROM story.outbox")


async def test_create_story_stores_it_and_publishes_story_created(story, events):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story

    assert created.portrait_status == pb.PORTRAIT_STATUS_PENDING
    fetched = (await story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)).story
    assert fetched == created
    [message] = await events(1)
    event = story_events_pb2.StoryCreated.FromString(message.data)
    assert event.story_id == created.story_id
    assert event.user_id == "u1"
    assert event.image_generation_prompt == created.image_generation_prompt
    assert event.portrait_attempt == 1
    assert message.headers["Nats-Msg-Id"] == f"story.created:{created.story_id}:1"


async def test_generate_story_with_the_local_writer(story, events):
    generated = (await story.GenerateStory(pb.GenerateStoryRequest(user_id="u1", theme="a lighthouse"), metadata=GATEWAY)).story

    assert generated.title and generated.patient.name and generated.image_generation_prompt
    assert 3 <= len(generated.chapters) <= 7
    assert all(chapter.text for chapter in generated.chapters)
    assert len(await events(1)) == 1


async def test_request_id_makes_creation_idempotent(story, events, db):
    request = pb.CreateStoryRequest(user_id="u1", content=valid_content(), request_id="r-1")
    first = (await story.CreateStory(request, metadata=GATEWAY)).story
    second = (await story.CreateStory(request, metadata=GATEWAY)).story
    generated = [
        (await story.GenerateStory(pb.GenerateStoryRequest(user_id="u2", request_id="g-1"), metadata=GATEWAY)).story
        for _ in range(2)
    ]

    assert first.story_id == second.story_id
    assert generated[0].story_id == generated[1].story_id
    assert await count_rows(db) == (2, 2)
    assert len(await events(2)) == 2


async def test_a_request_id_repeated_with_other_arguments_is_refused_and_writes_nothing(story, db):
    generate = pb.GenerateStoryRequest(user_id="u1", request_id="g-1", theme="a flooded ward")
    generated = (await story.GenerateStory(generate, metadata=GATEWAY)).story
    create = pb.CreateStoryRequest(user_id="u1", content=valid_content(), request_id="c-1")
    created = (await story.CreateStory(create, metadata=GATEWAY)).story
    retitled = pb.CreateStoryRequest(user_id="u1", content=valid_content(), request_id="c-1")
    retitled.content.title = "Another title"

    refused = [
        story.GenerateStory(pb.GenerateStoryRequest(user_id="u1", request_id="g-1", theme="a burning chapel"), metadata=GATEWAY),
        story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content(), request_id="g-1"), metadata=GATEWAY),
        story.GenerateStory(pb.GenerateStoryRequest(user_id="u1", request_id="c-1"), metadata=GATEWAY),
        story.CreateStory(retitled, metadata=GATEWAY),
    ]
    for call in refused:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(raised.value).fields == ("request_id",)
    assert (await story.GenerateStory(generate, metadata=GATEWAY)).story == generated
    assert (await story.CreateStory(create, metadata=GATEWAY)).story == created
    # Another user's request_id is their own.
    other = pb.GenerateStoryRequest(user_id="u2", request_id="g-1", theme="a burning chapel")
    assert (await story.GenerateStory(other, metadata=GATEWAY)).story.story_id != generated.story_id
    assert await count_rows(db) == (3, 3)


async def test_stories_from_before_request_digests_are_still_replayed(story, db):
    request = pb.CreateStoryRequest(user_id="u1", content=valid_content(), request_id="old-1")
    first = (await story.CreateStory(request, metadata=GATEWAY)).story
    await db.execute("UPDATE story.stories SET request_digest = NULL")  # as migration 0005 left older rows

    assert (await story.CreateStory(request, metadata=GATEWAY)).story == first


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.CreateStoryRequest(user_id="", content=valid_content()), "user_id"),
        (pb.CreateStoryRequest(user_id="   ", content=valid_content()), "user_id"),
        (pb.CreateStoryRequest(user_id="x" * 129, content=valid_content()), "user_id"),
        (pb.CreateStoryRequest(user_id="u1"), "content"),
        (pb.CreateStoryRequest(user_id="u1", content=valid_content(title="")), "content.title"),
        (pb.CreateStoryRequest(user_id="u1", content=pb.StoryContent(title="t", chapters=[pb.Chapter(title="a", text="b")])), "content.patient"),
        (pb.CreateStoryRequest(user_id="u1", content=valid_content(chapters=[])), "content.chapters"),
        (pb.CreateStoryRequest(user_id="u1", content=valid_content(image_generation_prompt="p" * 4001)), "content.image_generation_prompt"),
        (pb.CreateStoryRequest(user_id="u1", content=valid_content(), request_id="r" * 129), "request_id"),
    ],
)
async def test_bad_create_story_names_the_field_and_writes_nothing(story, db, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.CreateStory(request_, metadata=GATEWAY)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(f"{field}:")
    assert await count_rows(db) == (0, 0)


async def test_bad_patient_and_chapter_fields_are_named(story, db):
    content = valid_content()
    content.patient.age = 200
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content), metadata=GATEWAY)
    assert raised.value.details().startswith("content.patient.age:")

    content = valid_content()
    content.chapters[1].text = " "
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content), metadata=GATEWAY)
    assert raised.value.details().startswith("content.chapters[1].text:")
    assert await count_rows(db) == (0, 0)


@pytest.mark.parametrize("story_id", ["", "not-a-uuid"])
async def test_bad_story_id_is_invalid_argument(story, story_id):
    for call, request, metadata in [
        (story.GetStory, pb.GetStoryRequest(story_id=story_id), GATEWAY),
        (story.SetStoryImage, pb.SetStoryImageRequest(story_id=story_id, storage_id="portraits/x.png", attempt=1), IMAGE),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(request, metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("story_id:")


async def test_missing_story_is_not_found(story):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.GetStory(pb.GetStoryRequest(story_id="00000000-0000-4000-8000-000000000000"), metadata=GATEWAY)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_set_story_image_is_idempotent(story):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    request = pb.SetStoryImageRequest(story_id=created.story_id, storage_id=f"portraits/{created.story_id}/1.png", attempt=1)

    first = (await story.SetStoryImage(request, metadata=IMAGE)).story
    second = (await story.SetStoryImage(request, metadata=IMAGE)).story

    assert first.portrait_status == pb.PORTRAIT_STATUS_READY
    assert first.storage_id == request.storage_id
    assert second == first  # same update_time: the second call changed nothing


async def test_concurrent_images_for_one_attempt_attach_exactly_one(story):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    keys = [f"portraits/{created.story_id}/1-{n}.png" for n in range(8)]

    outcomes = await asyncio.gather(
        *(story.SetStoryImage(pb.SetStoryImageRequest(story_id=created.story_id, storage_id=key, attempt=1), metadata=IMAGE)
          for key in keys),
        return_exceptions=True,
    )

    attached = [outcome.story for outcome in outcomes if isinstance(outcome, pb.SetStoryImageResponse)]
    refused = [details_of(outcome).reason for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
    assert len(attached) == 1 and refused == ["PORTRAIT_ALREADY_FINAL"] * 7
    current = (await story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)).story
    assert current == attached[0] and current.storage_id in keys


async def test_image_for_a_missing_story_is_not_found(story):
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.SetStoryImage(pb.SetStoryImageRequest(story_id=missing, storage_id="portraits/x.png", attempt=1), metadata=IMAGE)
    assert (raised.value.code(), details_of(raised.value).reason) == (grpc.StatusCode.NOT_FOUND, "STORY_NOT_FOUND")


async def test_portrait_status_never_takes_back_a_ready_portrait(story):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    ready = (
        await story.SetStoryImage(
            pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/a.png", attempt=1), metadata=IMAGE
        )
    ).story
    after = (
        await story.SetPortraitStatus(
            pb.SetPortraitStatusRequest(
                story_id=created.story_id, status=pb.PORTRAIT_STATUS_SKIPPED, reason="late", attempt=1
            ),
            metadata=IMAGE,
        )
    ).story
    assert after == ready

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.SetPortraitStatus(
            pb.SetPortraitStatusRequest(
                story_id=created.story_id, status=pb.PORTRAIT_STATUS_READY, reason="x", attempt=1
            ),
            metadata=IMAGE,
        )
    assert raised.value.details().startswith("status:")


async def test_a_failed_attempt_cannot_become_ready_afterwards(story):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    failed = (
        await story.SetPortraitStatus(
            pb.SetPortraitStatusRequest(
                story_id=created.story_id, status=pb.PORTRAIT_STATUS_FAILED, reason="provider down", attempt=1
            ),
            metadata=IMAGE,
        )
    ).story
    assert (failed.portrait_status, failed.portrait_error) == (pb.PORTRAIT_STATUS_FAILED, "provider down")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.SetStoryImage(
            pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/a.png", attempt=1), metadata=IMAGE
        )
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(raised.value).reason == "PORTRAIT_ALREADY_FINAL"
    current = (await story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)).story
    assert current == failed


async def test_an_ended_attempt_keeps_its_first_ending(story):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story

    async def end(status: int, reason: str):
        request = pb.SetPortraitStatusRequest(story_id=created.story_id, status=status, reason=reason, attempt=1)
        return (await story.SetPortraitStatus(request, metadata=IMAGE)).story

    skipped = await end(pb.PORTRAIT_STATUS_SKIPPED, "no prompt")
    assert await end(pb.PORTRAIT_STATUS_SKIPPED, "no prompt") == skipped  # a replay changes nothing
    for status, reason in ((pb.PORTRAIT_STATUS_FAILED, "provider down"), (pb.PORTRAIT_STATUS_SKIPPED, "other")):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await end(status, reason)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert details_of(raised.value).reason == "PORTRAIT_ALREADY_FINAL"
    current = (await story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)).story
    assert current == skipped


async def test_a_page_of_the_longest_case_files_fits_a_default_client_and_the_walk_loses_none(story):
    longest = [pb.Chapter(title=f"Chapter {n}", text="The ward was quiet. " * 1000) for n in range(7)]
    made = [
        (await story.CreateStory(pb.CreateStoryRequest(user_id="u-long", content=case_file(chapters=longest)),
                                 metadata=GATEWAY)).story.story_id
        for _ in range(32)
    ]  # fmt: skip

    seen, token, pages = [], "", 0
    while True:
        page = await story.ListStories(pb.ListStoriesRequest(user_id="u-long", page_size=100, page_token=token),
                                       metadata=GATEWAY)  # fmt: skip
        assert page.ByteSize() < 4 * 1024 * 1024 and page.stories
        seen += [s.story_id for s in page.stories]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages > 1 and sorted(seen) == sorted(made) and len(seen) == len(set(seen))


async def test_callers_are_checked(story):
    request = pb.SetStoryImageRequest(story_id="00000000-0000-4000-8000-000000000000", storage_id="k")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.SetStoryImage(request)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.SetStoryImage(request, metadata=GATEWAY)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.GetStory(pb.GetStoryRequest(story_id=request.story_id), metadata=bearer_metadata("wrong"))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_stories_are_created_while_nats_is_down_and_published_when_it_returns(story, events, nats_server, db):
    await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)
    assert len(await events(1)) == 1  # the relay is connected and the stream exists
    nats_server.stop()

    made_offline = [
        (await story.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=GATEWAY)).story.story_id for _ in range(3)
    ]
    await asyncio.sleep(0.5)
    assert await db.fetchval("SELECT count(*) FROM story.outbox WHERE published_at IS NULL") == 3

    nats_server.start()
    published = await events(4, timeout=30)
    ids = {story_events_pb2.StoryCreated.FromString(m.data).story_id for m in published}
    assert set(made_offline) <= ids
    assert len(published) == 4
    assert await db.fetchval("SELECT count(*) FROM story.outbox WHERE published_at IS NULL") == 0


async def test_republishing_an_outbox_row_creates_no_second_event(story, events, db):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    assert len(await events(1)) == 1

    # As if the relay crashed after publishing but before marking the row published.
    await db.execute("UPDATE story.outbox SET published_at = NULL")
    await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)  # wakes the relay
    published = await events(2)

    assert len(published) == 2
    assert [story_events_pb2.StoryCreated.FromString(m.data).story_id for m in published].count(created.story_id) == 1
    assert await db.fetchval("SELECT count(*) FROM story.outbox WHERE published_at IS NULL") == 0


async def test_a_failed_outbox_insert_stores_no_story(story, db):
    await db.execute(
        """CREATE FUNCTION story.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'outbox refused'; END $$;
           CREATE TRIGGER refuse BEFORE INSERT ON story.outbox FOR EACH ROW EXECUTE FUNCTION story.refuse();"""
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)

    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert await count_rows(db) == (0, 0)


async def test_watch_story_streams_until_the_portrait_is_ready(story):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    seen = []

    async def watch():
        async for response in story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY):
            seen.append(response.story.portrait_status)

    watcher = asyncio.create_task(watch())
    async with asyncio.timeout(10):
        while not seen:  # the first message (the current state) means the watch is set up
            await asyncio.sleep(0.01)
    await story.SetStoryImage(pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/x.png", attempt=1), metadata=IMAGE)
    await asyncio.wait_for(watcher, 10)

    assert seen == [pb.PORTRAIT_STATUS_PENDING, pb.PORTRAIT_STATUS_READY]


async def test_list_stories_pages_newest_first(story):
    ids = [
        (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story.story_id
        for _ in range(5)
    ]
    await story.CreateStory(pb.CreateStoryRequest(user_id="someone-else", content=valid_content()), metadata=GATEWAY)

    listed, token = [], ""
    while True:
        page = await story.ListStories(pb.ListStoriesRequest(user_id="u1", page_size=2, page_token=token), metadata=GATEWAY)
        listed += [s.story_id for s in page.stories]
        token = page.next_page_token
        if not token:
            break
    assert listed == list(reversed(ids))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.ListStories(pb.ListStoriesRequest(user_id="u1", page_token="garbage"), metadata=GATEWAY)
    assert raised.value.details().startswith("page_token:")


async def test_a_page_token_belongs_to_its_users_list_and_an_older_token_still_resumes(story):
    ids = [
        (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story.story_id
        for _ in range(3)
    ]
    first = await story.ListStories(pb.ListStoriesRequest(user_id="u1", page_size=1), metadata=GATEWAY)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.ListStories(pb.ListStoriesRequest(user_id="u2", page_token=first.next_page_token), metadata=GATEWAY)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(raised.value).fields == ("page_token",) and "another user's list" in raised.value.details()
    # A token made before tokens named their list: [create_time, story_id].
    last = (await story.GetStory(pb.GetStoryRequest(story_id=ids[2]), metadata=GATEWAY)).story
    older = base64.urlsafe_b64encode(json.dumps([last.create_time.ToDatetime(tzinfo=datetime.UTC).isoformat(),
                                                 last.story_id]).encode()).decode()  # fmt: skip
    rest = await story.ListStories(pb.ListStoriesRequest(user_id="u1", page_token=older), metadata=GATEWAY)
    assert [s.story_id for s in rest.stories] == [ids[1], ids[0]]


async def test_retry_portrait_publishes_a_new_attempt(story, events):
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=valid_content()), metadata=GATEWAY)).story
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.RetryPortrait(pb.RetryPortraitRequest(story_id=created.story_id), metadata=ADMIN)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(raised.value).reason == "PORTRAIT_IN_PROGRESS"
    await story.SetPortraitStatus(
        pb.SetPortraitStatusRequest(story_id=created.story_id, status=pb.PORTRAIT_STATUS_FAILED, reason="down", attempt=1),
        metadata=IMAGE,
    )

    retried = (await story.RetryPortrait(pb.RetryPortraitRequest(story_id=created.story_id), metadata=ADMIN)).story

    assert (retried.portrait_status, retried.portrait_attempt) == (pb.PORTRAIT_STATUS_PENDING, 2)
    published = await events(2)
    assert [story_events_pb2.StoryCreated.FromString(m.data).portrait_attempt for m in published] == [1, 2]
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # the first attempt's image comes too late
        await story.SetStoryImage(pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/x.png", attempt=1), metadata=IMAGE)
    assert details_of(raised.value).reason == "STALE_ATTEMPT"
    await story.SetStoryImage(pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/x.png", attempt=2), metadata=IMAGE)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.RetryPortrait(pb.RetryPortraitRequest(story_id=created.story_id), metadata=ADMIN)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(raised.value).reason == "PORTRAIT_ALREADY_READY"


@pytest.fixture
async def anthropic_story(anthropic_server):
    stub, fake, _ = anthropic_server
    yield stub, fake


@pytest.fixture
async def anthropic_server(database_url, nats_server):
    """The story service writing with the real Anthropic client against a fake server, its
    metrics on a port of its own."""
    async with FakeAnthropic(api_key="k-test") as fake, contextlib.AsyncExitStack() as stack:
        config = Config.from_env(
            {
                "STORY_ADDR": "127.0.0.1:0",
                "DATABASE_URL": database_url,
                "NATS_URL": nats_server.url,
                "AUTH_TOKENS": TOKENS,
                "STORY_WRITER": "anthropic",
                "ANTHROPIC_API_KEY": "k-test",
                "ANTHROPIC_BASE_URL": fake.base_url,
                "ANTHROPIC_MODEL": "claude-test-model",
                "METRICS_ADDR": "127.0.0.1:0",
            }
        )
        server = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield story_service_pb2_grpc.StoryServiceStub(channel), fake, server


async def test_generate_story_with_the_anthropic_writer(anthropic_story):
    stub, fake = anthropic_story

    generated = (await stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1", theme="fog"), metadata=GATEWAY)).story

    assert generated.title == SAMPLE_STORY["title"]
    assert generated.patient.name == SAMPLE_STORY["patient"]["name"]
    [request] = fake.requests_to("/v1/messages")
    assert request.json()["model"] == "claude-test-model"
    assert "fog" in json.dumps(request.json()["messages"])



async def test_retries_of_one_generate_story_pay_the_writer_once(anthropic_story, db):
    stub, fake = anthropic_story
    fake.delay_seconds = 0.3  # a slow model: the gateway's retries arrive while it writes
    request = pb.GenerateStoryRequest(user_id="u1", request_id="slow-1", theme="fog")

    answers = await asyncio.gather(*(stub.GenerateStory(request, metadata=GATEWAY) for _ in range(12)))

    assert len({answer.story.story_id for answer in answers}) == 1
    assert len(fake.requests_to("/v1/messages")) == 1
    assert await count_rows(db) == (1, 1)


@pytest.mark.parametrize(("status", "reply"), [(529, None), (400, None), (None, "this is not a story")])
async def test_a_failing_writer_is_unavailable_and_stores_nothing(anthropic_story, db, status, reply):
    stub, fake = anthropic_story
    if status is not None:
        fake.fail_next(5, status=status)
    else:
        fake.reply_text = reply

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=GATEWAY)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await count_rows(db) == (0, 0)


# ---------------------------------------------------------------------------- richer case files


async def test_a_created_story_carries_gender_admission_date_difficulty_and_its_author(story):
    content = case_file()
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content), metadata=GATEWAY)).story

    assert (created.patient.gender, created.patient.admission_date) == (pb.GENDER_FEMALE, "1894-03-12")
    assert (created.writer, created.writer_model, created.theme) == ("caller", "", "")
    expected = story_typing_difficulty(content.title, [Chapter(c.title, c.text) for c in content.chapters])
    assert created.typing_difficulty == expected > 0
    fetched = (await story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)).story
    assert fetched == created


async def test_a_generated_story_records_its_theme_writer_and_model(story):
    generated = (
        await story.GenerateStory(pb.GenerateStoryRequest(user_id="u1", theme="  a drowned lighthouse "), metadata=GATEWAY)
    ).story

    assert (generated.writer, generated.writer_model, generated.theme) == ("local", "templates", "a drowned lighthouse")
    assert generated.patient.gender in (pb.GENDER_FEMALE, pb.GENDER_MALE)
    assert len(generated.patient.admission_date) == 10
    assert 3 <= len(generated.chapters) <= 7
    assert generated.typing_difficulty == story_typing_difficulty(
        generated.title, [Chapter(c.title, c.text) for c in generated.chapters]
    )


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (case_file(chapters=chapters(2)), "content.chapters"),
        (case_file(chapters=chapters(8)), "content.chapters"),
        (case_file(patient=patient(gender=pb.GENDER_UNSPECIFIED)), "content.patient.gender"),
        (case_file(patient=patient(gender=7)), "content.patient.gender"),
        (case_file(patient=patient(admission_date="")), "content.patient.admission_date"),
        (case_file(patient=patient(admission_date="12/03/1894")), "content.patient.admission_date"),
        (case_file(patient=patient(admission_date="1894-02-30")), "content.patient.admission_date"),
        (case_file(patient=patient(admission_date="1799-12-31")), "content.patient.admission_date"),
        (case_file(patient=patient(admission_date="2101-01-01")), "content.patient.admission_date"),
        (case_file(patient=patient(age=131)), "content.patient.age"),
        (case_file(title="# Ward *Nine*"), "content.title"),
        (case_file(chapters=[*chapters(2), pb.Chapter(title="Last", text="She <screamed>.")]), "content.chapters[2].text"),
        (case_file(chapters=[*chapters(2), pb.Chapter(title="Last", text="x" * 20_001)]), "content.chapters[2].text"),
        (case_file(chapters=[pb.Chapter(title="Two\nlines", text="a"), *chapters(2)]), "content.chapters[0].title"),
    ],
)
async def test_case_file_limits_are_invalid_argument_naming_the_field(story, db, content, field):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content), metadata=GATEWAY)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(raised.value).fields == (field,)
    assert raised.value.details().startswith(f"{field}:")
    assert await count_rows(db) == (0, 0)


# ---------------------------------------------------------------------------- errors a program can act on


async def refusal(call):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return details_of(raised.value)


async def test_typical_refusals_carry_details_a_client_reads(story):
    missing = "00000000-0000-4000-8000-000000000000"
    created = (await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=case_file()), metadata=GATEWAY)).story

    invalid = await refusal(story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=case_file(title="")), metadata=GATEWAY))
    not_found = await refusal(story.GetStory(pb.GetStoryRequest(story_id=missing), metadata=GATEWAY))
    stale = await refusal(
        story.SetStoryImage(
            pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/x/2.png", attempt=2), metadata=IMAGE
        )
    )
    in_progress = await refusal(story.RetryPortrait(pb.RetryPortraitRequest(story_id=created.story_id), metadata=ADMIN))

    assert (invalid.code, invalid.violations) == (grpc.StatusCode.INVALID_ARGUMENT, (("content.title", "must not be empty"),))
    assert (invalid.reason, invalid.retry_after_seconds) == ("", None)
    assert (not_found.code, not_found.reason, not_found.domain) == (grpc.StatusCode.NOT_FOUND, "STORY_NOT_FOUND", "story.casefile")
    assert not_found.metadata == {"story_id": missing}
    assert (stale.code, stale.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STALE_ATTEMPT")
    assert stale.metadata == {"story_id": created.story_id, "attempt": "2", "current_attempt": "1"}
    assert (in_progress.code, in_progress.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PORTRAIT_IN_PROGRESS")
    assert in_progress.metadata == {"story_id": created.story_id, "attempt": "1"}


async def test_a_writer_told_to_wait_is_unavailable_with_that_wait_as_retry_info(anthropic_story, db):
    stub, fake = anthropic_story
    # Longer than the writer's retry budget: the caller hears it at once instead of after it.
    fake.fail_next(1, status=429, message="rate limited", headers={"retry-after": "120"})

    details = await refusal(stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=GATEWAY))

    assert (details.code, details.reason, details.domain) == (grpc.StatusCode.UNAVAILABLE, "WRITER_UNAVAILABLE", "story.casefile")
    assert details.retry_after_seconds == 120
    assert "rate limited" in details.message
    assert len(fake.requests_to("/v1/messages")) == 1
    assert await count_rows(db) == (0, 0)



# ---------------------------------------------------------------------------- metrics


async def test_writer_calls_and_retries_are_counted_by_outcome_and_reason(anthropic_server):
    stub, fake, server = anthropic_server
    before = await scrape(server.metrics.url)
    fake.fail_next(1, status=429, message="slow down")
    fake.reply_next("no JSON here")  # then an unusable reply, sent back once

    await stub.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=GATEWAY)
    after = await scrape(server.metrics.url)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, kind="writer", provider="anthropic", **labels) - before.value(
            name, kind="writer", provider="anthropic", **labels
        )

    assert moved("casefile_provider_retries_total", reason="rate_limited") == 1
    assert moved("casefile_provider_retries_total", reason="unusable_reply") == 1
    assert moved("casefile_provider_call_seconds_count", outcome="transient_error") == 1
    assert moved("casefile_provider_call_seconds_count", outcome="ok") == 2
    assert len(fake.requests_to("/v1/messages")) == 3


async def test_outbox_backlog_and_publish_lag_while_nats_is_away(database_url, nats_server):
    config = Config.from_env(
        {"STORY_ADDR": "127.0.0.1:0", "DATABASE_URL": database_url, "NATS_URL": nats_server.url, "AUTH_TOKENS": TOKENS,
         "OUTBOX_POLL_INTERVAL_SECONDS": "0.1", "METRICS_ADDR": "127.0.0.1:0"}
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        server = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        stub = story_service_pb2_grpc.StoryServiceStub(channel)
        before = await scrape(server.metrics.url)
        nats_server.stop()
        for user in ("u1", "u2"):
            await stub.CreateStory(pb.CreateStoryRequest(user_id=user, content=case_file()), metadata=GATEWAY)
        waiting = await scrape(server.metrics.url)
        nats_server.start()
        async with asyncio.timeout(30):  # a hang guard: the relay publishes once NATS is back
            while (drained := await scrape(server.metrics.url)).value("casefile_outbox_backlog", outbox=OUTBOX):
                await asyncio.sleep(0.1)

    assert waiting.value("casefile_outbox_backlog", outbox=OUTBOX) == 2
    assert waiting.value("casefile_outbox_oldest_unpublished_seconds", outbox=OUTBOX) > 0
    assert drained.value("casefile_outbox_oldest_unpublished_seconds", outbox=OUTBOX) == 0
    published = "casefile_outbox_published_total"
    assert drained.value(published, outbox=OUTBOX) - before.value(published, outbox=OUTBOX) == 2
    lag = "casefile_outbox_publish_lag_seconds"
    assert drained.value(f"{lag}_count", outbox=OUTBOX) - before.value(f"{lag}_count", outbox=OUTBOX) == 2
    # Their lag includes the outage they waited out.
    assert drained.value(f"{lag}_sum", outbox=OUTBOX) - before.value(f"{lag}_sum", outbox=OUTBOX) > 0

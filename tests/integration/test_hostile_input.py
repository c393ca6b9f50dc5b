"""Hostile and random requests against the real story and image servers.

Whatever a caller sends (NUL bytes, control characters, huge numbers, forged page tokens,
unknown enum values), the answer is never INTERNAL or UNKNOWN, and a refused request
writes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casefile.image.v1 import image_service_pb2 as image_pb
from casefile.image.v1 import image_service_pb2_grpc
from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.image.config import Config as ImageConfig
from services.image.main import build as build_image
from services.story.config import Config as StoryConfig
from services.story.main import build as build_story
from shared.auth import bearer_metadata
from shared.grpc_errors import details_of
from tests.fakes.tcp_proxy import TcpProxy
from tools.infra import free_port
from tests.case_files import case_file, chapters, patient

pytestmark = pytest.mark.timeout(120)

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
GATEWAY = bearer_metadata("t-gateway")
IMAGE = bearer_metadata("t-image")
ADMIN = bearer_metadata("t-admin")
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
HOSTILE = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# Text a fuzzer would send: anything, with control characters and NULs well represented.
hostile_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from("a \x00\x01\n\t\r\x1b\u2028\x7f\u0085é"), max_size=40),
    st.sampled_from(["", " ", "u1 ", "\x00", "a" * 129, "x" * 5000]),
)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


def _token(parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode()


page_tokens = st.one_of(
    hostile_text,
    st.builds(
        _token,
        st.lists(
            st.one_of(
                st.integers(), st.floats(allow_nan=False), st.none(), st.text(max_size=30),
                st.sampled_from(["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00", "2024-01-01T00:00:00"]),
                st.just(str(uuid.uuid4())),
            ),
            max_size=3,
        ),
    ),
)


@pytest.fixture
async def channels(database_url, nats_server, s3_endpoint_url, s3_bucket):
    """(story channel, image channel) to both services, built as main() builds them."""
    story_addr = f"127.0.0.1:{free_port()}"
    async with contextlib.AsyncExitStack() as stack:
        await build_story(
            StoryConfig.from_env(
                {"STORY_ADDR": story_addr, "DATABASE_URL": database_url, "NATS_URL": nats_server.url, "AUTH_TOKENS": TOKENS}
            ),
            stack,
        )
        image = await build_image(
            ImageConfig.from_env(
                {
                    "IMAGE_ADDR": "127.0.0.1:0",
                    "DATABASE_URL": database_url,
                    "NATS_URL": nats_server.url,
                    "S3_ENDPOINT_URL": s3_endpoint_url,
                    "S3_BUCKET": s3_bucket,
                    "STORY_ADDR": story_addr,
                    "AUTH_TOKENS": TOKENS,
                }
            ),
            stack,
        )
        story_channel = grpc.aio.insecure_channel(story_addr)
        image_channel = grpc.aio.insecure_channel(f"127.0.0.1:{image.port}")
        stack.push_async_callback(story_channel.close)
        stack.push_async_callback(image_channel.close)
        yield story_channel, image_channel


@pytest.fixture
def servers(channels):
    story_channel, image_channel = channels
    return story_service_pb2_grpc.StoryServiceStub(story_channel), image_service_pb2_grpc.ImageServiceStub(image_channel)


@pytest.fixture
async def db(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def fuzz(check, **strategies) -> None:
    """Runs hypothesis over the async `check` against the servers in this test's loop.

    Hypothesis drives sync functions only: it runs in a thread, and each example is handed
    back to this loop, which is free (it awaits the thread) to serve the calls.
    """
    loop = asyncio.get_running_loop()

    @HOSTILE
    @given(**strategies)
    def run(**example):
        asyncio.run_coroutine_threadsafe(check(**example), loop).result(timeout=60)

    await asyncio.to_thread(run)


async def rows(db) -> tuple[int, int]:
    return await db.fetchval("SELECT count(*) FROM story.stories"), await db.fetchval("SELECT count(*) FROM story.outbox")


async def answer(call) -> grpc.StatusCode:
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        assert error.code() not in NEVER, f"{error.code()}: {error.details()}"
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert details_of(error).fields, "INVALID_ARGUMENT must name the field"
        return error.code()
    assert response is not None
    return grpc.StatusCode.OK


async def first_of_stream(stream) -> grpc.StatusCode:
    try:
        async for _ in stream:
            break
    except grpc.aio.AioRpcError as error:
        assert error.code() not in NEVER, f"{error.code()}: {error.details()}"
        return error.code()
    finally:
        stream.cancel()
    return grpc.StatusCode.OK


def content(
    title, name, diagnosis, appearance, chapter_title, chapter_text, prompt, age, gender=pb.GENDER_MALE,
    admission_date="1901-01-01",
) -> pb.StoryContent:
    return case_file(
        title=title,
        patient=patient(
            name=name, age=age, diagnosis=diagnosis, appearance=appearance, gender=gender, admission_date=admission_date
        ),
        chapters=[pb.Chapter(title=chapter_title, text=chapter_text), *chapters(2)],
        image_generation_prompt=prompt,
    )


async def test_hostile_story_writes_are_refused_cleanly_and_write_nothing(servers, db):
    story, _ = servers

    async def check(user_id, request_id, fields, theme):
        before = await rows(db)
        created = await answer(
            story.CreateStory(
                pb.CreateStoryRequest(user_id=user_id, content=content(*fields), request_id=request_id), metadata=GATEWAY
            )
        )
        generated = await answer(
            story.GenerateStory(pb.GenerateStoryRequest(user_id=user_id, theme=theme, request_id=request_id), metadata=GATEWAY)
        )
        grown = [a - b for a, b in zip(await rows(db), before, strict=True)]
        accepted = (created == grpc.StatusCode.OK) + (generated == grpc.StatusCode.OK)
        # Each accepted call writes at most one story and its event (a repeated request_id none).
        assert grown[0] == grown[1] and grown[0] <= accepted

    await fuzz(
        check,
        user_id=hostile_text,
        request_id=hostile_text,
        fields=st.tuples(
            *[hostile_text] * 7,
            int32,
            st.one_of(st.sampled_from([0, 1, 2, 3]), int32),
            st.one_of(hostile_text, st.sampled_from(["1894-03-12", "1894-02-30", "2101-01-01", "1894-3-12", "０１"])),
        ),
        theme=hostile_text,
    )


async def test_hostile_story_reads_and_portrait_calls_never_fail_internally(servers, db):
    story, _ = servers
    real = (
        await story.CreateStory(
            pb.CreateStoryRequest(
                user_id="u1", content=content("t", "n", "d", "a", "c", "line one\nline two", "p", 40)
            ),
            metadata=GATEWAY,
        )
    ).story

    story_ids = st.one_of(hostile_text, st.just(real.story_id), st.just(str(uuid.uuid4())))

    async def check(story_id, storage_id, attempt, status, reason, user_id, page_size, page_token):
        await answer(story.GetStory(pb.GetStoryRequest(story_id=story_id), metadata=GATEWAY))
        await answer(
            story.ListStories(
                pb.ListStoriesRequest(user_id=user_id, page_size=page_size, page_token=page_token), metadata=GATEWAY
            )
        )
        await first_of_stream(story.WatchStory(pb.WatchStoryRequest(story_id=story_id), metadata=GATEWAY))
        await answer(story.RetryPortrait(pb.RetryPortraitRequest(story_id=story_id), metadata=ADMIN))
        await answer(
            story.SetPortraitStatus(
                pb.SetPortraitStatusRequest(story_id=story_id, status=status, reason=reason, attempt=attempt),
                metadata=IMAGE,
            )
        )
        await answer(
            story.SetStoryImage(
                pb.SetStoryImageRequest(story_id=story_id, storage_id=storage_id, attempt=attempt), metadata=IMAGE
            )
        )

    await fuzz(
        check,
        story_id=story_ids,
        storage_id=hostile_text,
        attempt=int32,
        status=int32,
        reason=hostile_text,
        user_id=hostile_text,
        page_size=int32,
        page_token=page_tokens,
    )


async def test_hostile_image_requests_never_fail_internally(servers):
    _, image = servers

    async def check(storage_id, user_id, expires, job_id):
        await answer(
            image.GetImageUrl(
                image_pb.GetImageUrlRequest(storage_id=storage_id, user_id=user_id, expires_in_seconds=expires),
                metadata=GATEWAY,
            )
        )
        await answer(image.GetGenerationJob(image_pb.GetGenerationJobRequest(job_id=job_id, user_id=user_id), metadata=GATEWAY))

    await fuzz(check, storage_id=hostile_text, user_id=hostile_text, expires=int32, job_id=hostile_text)


FIELDS_WITH_TEXT = [
    ("user_id", lambda bad: pb.CreateStoryRequest(user_id=bad, content=content("t", "n", "d", "a", "c", "x", "p", 1))),
    ("request_id", lambda bad: pb.CreateStoryRequest(user_id="u1", request_id=bad, content=content("t", "n", "d", "a", "c", "x", "p", 1))),
    ("content.title", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content(bad, "n", "d", "a", "c", "x", "p", 1))),
    ("content.patient.name", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content("t", bad, "d", "a", "c", "x", "p", 1))),
    ("content.patient.diagnosis", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content("t", "n", bad, "a", "c", "x", "p", 1))),
    ("content.patient.appearance", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", bad, "c", "x", "p", 1))),
    ("content.chapters[0].title", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", bad, "x", "p", 1))),
    ("content.chapters[0].text", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", "c", bad, "p", 1))),
    ("content.image_generation_prompt", lambda bad: pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", "c", "x", bad, 1))),
]


@pytest.mark.parametrize(("field", "request_with"), FIELDS_WITH_TEXT, ids=[field for field, _ in FIELDS_WITH_TEXT])
async def test_a_nul_byte_in_any_text_field_is_invalid_argument_naming_it(servers, db, field, request_with):
    story, _ = servers
    for bad in ("a\x00b", "bell\x07", "esc\x1b[31m"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await story.CreateStory(request_with(bad), metadata=GATEWAY)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(raised.value).fields == (field,)
    assert await rows(db) == (0, 0)


async def test_newlines_stay_allowed_in_chapter_text_but_tabs_and_markup_do_not(servers):
    story, _ = servers
    created = await story.CreateStory(
        pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", "c", "one\n\ntwo", "p", 1)),
        metadata=GATEWAY,
    )
    assert created.story.chapters[0].text == "one\n\ntwo"

    for text, problem in [
        ("one\n\ttwo", "control characters"),
        ("She *screamed*.", "remove *"),
        ("<b>Night</b>", "remove < >"),
        ("Zo\u00eb \u201cwept\u201d", "remove \u00eb \u201c \u201d"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await story.CreateStory(
                pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", "c", text, "p", 1)),
                metadata=GATEWAY,
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(raised.value).fields == ("content.chapters[0].text",)
        assert problem in raised.value.details()


SOME_UUID = "7d0c9a52-3c2e-4f0e-9b8a-2f1d3c4b5a69"


@pytest.mark.parametrize(
    "token",
    [
        _token(["2024-01-01T00:00:00+00:00", 12345]),  # a number where the UUID belongs
        _token(["9999-12-31T23:59:59-23:59", SOME_UUID]),  # out of range once in UTC
        _token(["2024-01-01T00:00:00", SOME_UUID]),  # no time zone
        _token([1, 2]),
        _token({"a": 1}),
        "not base64 at all \x00",
    ],
    ids=["number-for-uuid", "out-of-range-time", "naive-time", "numbers", "object", "garbage"],
)
async def test_forged_page_tokens_are_invalid_argument(servers, token):
    story, _ = servers
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.ListStories(pb.ListStoriesRequest(user_id="u1", page_token=token), metadata=GATEWAY)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(raised.value).fields == ("page_token",)


async def test_list_stories_with_a_nul_in_the_user_id_is_invalid_argument(servers):
    story, _ = servers
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await story.ListStories(pb.ListStoriesRequest(user_id="u\x001"), metadata=GATEWAY)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_database_going_away_is_unavailable_for_reads_and_watches(database_url, nats_server):
    parts = urlsplit(database_url)
    async with TcpProxy(parts.hostname, parts.port or 5432) as proxy, contextlib.AsyncExitStack() as stack:
        proxied = parts._replace(netloc=f"{parts.username}@{proxy.address}").geturl()
        server = await build_story(
            StoryConfig.from_env(
                {"STORY_ADDR": "127.0.0.1:0", "DATABASE_URL": proxied, "NATS_URL": nats_server.url, "AUTH_TOKENS": TOKENS}
            ),
            stack,
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        story = story_service_pb2_grpc.StoryServiceStub(channel)
        created = (
            await story.CreateStory(
                pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", "c", "x", "p", 1)), metadata=GATEWAY
            )
        ).story
        await proxy.cut()

        assert await first_of_stream(
            story.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY)
        ) == grpc.StatusCode.UNAVAILABLE
        assert await answer(
            story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)
        ) == grpc.StatusCode.UNAVAILABLE
        assert await answer(
            story.ListStories(pb.ListStoriesRequest(user_id="u1"), metadata=GATEWAY)
        ) == grpc.StatusCode.UNAVAILABLE
        # A client can act on it: the reason, and how long to wait before trying again.
        for call in (
            story.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY),
            story.CreateStory(
                pb.CreateStoryRequest(user_id="u1", content=content("t", "n", "d", "a", "c", "x", "p", 1)), metadata=GATEWAY
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            details = details_of(raised.value)
            assert (details.code, details.reason, details.domain) == (
                grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE", "story.casefile"
            )
            assert details.retry_after_seconds == 1.0


@pytest.mark.parametrize(
    ("service", "method", "streaming"),
    [
        ("casefile.story.v1.StoryService", "CreateStory", False),
        ("casefile.story.v1.StoryService", "WatchStory", True),
        ("casefile.image.v1.ImageService", "GetImageUrl", False),
        ("casefile.image.v1.ImageService", "WatchGenerationJob", True),
    ],
)
@pytest.mark.parametrize("raw", [b"\x0a\x02\xff\xfe", b"\xff" * 12, b"\x08"], ids=["bad-utf8", "garbage", "truncated"])
async def test_request_bytes_that_are_no_message_are_invalid_argument(channels, service, method, streaming, raw):
    # A fuzzer's first packet: bytes that parse as no request (invalid UTF-8 in a string
    # field, garbage, a truncated varint). grpc's own deserializer would answer UNKNOWN.
    channel = channels[0] if ".story." in service else channels[1]
    path = f"/{service}/{method}"
    metadata = GATEWAY
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if streaming:
            async for _ in channel.unary_stream(path)(raw, metadata=metadata, timeout=10):
                pass
        else:
            await channel.unary_unary(path)(raw, metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert details_of(caught.value).fields == ("request",)

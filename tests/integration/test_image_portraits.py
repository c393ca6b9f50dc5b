"""The portrait pipeline of the image service, end to end on real servers.

Each test runs the real image service (build()) against its own nats-server, its own
PostgreSQL database and a fresh bucket on moto. The story service is played by a small
real grpc.aio StoryService that records SetStoryImage / SetPortraitStatus: a fake peer,
so that what the image service did is visible call by call.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from urllib.parse import urlsplit, urlunsplit

import aiobotocore.session
import asyncpg
import grpc
import nats
import pytest
from PIL import Image

from casefile.story.v1 import story_events_pb2, story_service_pb2, story_service_pb2_grpc
from services.image.config import Config
from services.image.main import build
from shared.nats import ensure_stream, msg_id_headers
from shared.streams import STORY_EVENTS
from tests.fakes.s3_requests import requests_to
from tests.fakes.recraft import FakeRecraft
from tests.fakes.tcp_proxy import TcpProxy
from tests.polling import eventually
from tests.scrape import scrape

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STREAM = "STORY_EVENTS"
DURABLE = "image-portraits"
# Short enough that a redelivery or a give-up happens within a test's few seconds.
FAST_SETTINGS = {
    "PORTRAIT_REDELIVERY_BACKOFF_SECONDS": "0.2,0.4",
    "PORTRAIT_ATTEMPT_BUDGET_SECONDS": "60",
    "PORTRAIT_MAX_DELIVER": "8",
    "PORTRAIT_CONCURRENCY": "4",
}


# ---------------------------------------------------------------------------- the story peer


class RecordingStoryService(story_service_pb2_grpc.StoryServiceServicer):
    """Plays the story service for the three calls the image service makes, and records them.

    It holds stories (prompt, current attempt, status) the way the real one does, refuses
    a stale attempt with FAILED_PRECONDITION, and fails when told to.
    """

    def __init__(self) -> None:
        self.stories: dict[str, dict] = {}
        self.images: list[tuple[str, str]] = []
        self.image_attempts: list[int] = []
        self.statuses: list[tuple[str, int, str]] = []
        self.unavailable_next = 0
        self.callers: set[str] = set()
        # When set to an Event, GetStory waits for it: a paint that stays in work.
        self.block_get_story: asyncio.Event | None = None

    def add(self, prompt: str, *, attempt: int = 1, story_id: str | None = None) -> str:
        story_id = story_id or str(uuid.uuid4())
        self.stories[story_id] = {
            "prompt": prompt,
            "attempt": attempt,
            "status": story_service_pb2.PORTRAIT_STATUS_PENDING,
            "storage_id": "",
        }
        return story_id

    def _story(self, story_id: str) -> story_service_pb2.Story:
        story = self.stories[story_id]
        return story_service_pb2.Story(
            story_id=story_id,
            image_generation_prompt=story["prompt"],
            portrait_attempt=story["attempt"],
            portrait_status=story["status"],
            storage_id=story["storage_id"],
        )

    async def GetStory(self, request, context):
        await self._admit(context)
        if self.block_get_story is not None:
            await self.block_get_story.wait()
        if request.story_id not in self.stories:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such story")
        return story_service_pb2.GetStoryResponse(story=self._story(request.story_id))

    async def SetStoryImage(self, request, context):
        await self._admit(context)
        if self.unavailable_next:
            self.unavailable_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "story is restarting")
        story = await self._current(request.story_id, request.attempt, context)
        self.images.append((request.story_id, request.storage_id))
        self.image_attempts.append(request.attempt)
        story.update(status=story_service_pb2.PORTRAIT_STATUS_READY, storage_id=request.storage_id)
        return story_service_pb2.SetStoryImageResponse(story=self._story(request.story_id))

    async def SetPortraitStatus(self, request, context):
        await self._admit(context)
        story = await self._current(request.story_id, request.attempt, context)
        self.statuses.append((request.story_id, request.status, request.reason))
        if story["status"] != story_service_pb2.PORTRAIT_STATUS_READY:
            story["status"] = request.status
        return story_service_pb2.SetPortraitStatusResponse(story=self._story(request.story_id))

    async def _current(self, story_id: str, attempt: int, context) -> dict:
        if story_id not in self.stories:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such story")
        story = self.stories[story_id]
        if attempt != story["attempt"]:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stale attempt")
        return story

    async def _admit(self, context) -> None:
        metadata = dict(context.invocation_metadata())
        self.callers.add(metadata.get("authorization", ""))
        if metadata.get("authorization") != "Bearer t-image":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")


@pytest.fixture
async def story_peer():
    servicer = RecordingStoryService()
    server = grpc.aio.server()
    story_service_pb2_grpc.add_StoryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    await server.stop(0)


# ---------------------------------------------------------------------------- the image service


@pytest.fixture
def image_env(database_url, nats_server, s3_endpoint_url, s3_bucket, story_peer):
    def make(**overrides: str) -> dict[str, str]:
        return {
            "IMAGE_ADDR": "127.0.0.1:0",
            "DATABASE_URL": database_url,
            "NATS_URL": nats_server.url,
            "S3_ENDPOINT_URL": s3_endpoint_url,
            "S3_BUCKET": s3_bucket,
            "STORY_ADDR": story_peer.address,
            "AUTH_TOKENS": TOKENS,
            "PORTRAIT_PROVIDER": "local",
            **FAST_SETTINGS,
            **overrides,
        }

    return make


@pytest.fixture
async def start_image(image_env):
    """start_image(env) builds the image service; everything closes after the test."""
    # Depending on image_env makes the service stop before its database, NATS and S3 go.
    async with contextlib.AsyncExitStack() as stack:

        async def start(env: dict[str, str]):
            return await build(Config.from_env(env), stack)

        yield start


@pytest.fixture
async def s3(s3_endpoint_url):
    session = aiobotocore.session.get_session()
    async with session.create_client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1") as client:
        yield client


@pytest.fixture
async def js(nats_server):
    """The test's own JetStream connection, playing the story service's outbox relay."""
    nc = await nats.connect(nats_server.url)
    context = nc.jetstream()
    await ensure_stream(context, STORY_EVENTS)
    yield context
    await nc.close()


@pytest.fixture
async def db(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def publish_story_created(js, story_id: str, prompt: str = "", *, attempt: int = 1, msg_id: str | None = None):
    """What the outbox relay publishes; the prompt in it is ignored (the story is the truth)."""
    event = story_events_pb2.StoryCreated(
        story_id=story_id, user_id="u1", image_generation_prompt=prompt, portrait_attempt=attempt
    )
    headers = msg_id_headers(msg_id or f"story.created:{story_id}:{attempt}")
    return await js.publish("story.created", event.SerializeToString(), headers=headers)


async def new_story(js, story_peer, prompt: str, *, attempt: int = 1) -> str:
    story_id = story_peer.add(prompt, attempt=attempt)
    await publish_story_created(js, story_id, prompt, attempt=attempt)
    return story_id


async def consumer_settled(js, messages: int) -> bool:
    """Every one of the first `messages` stream messages was acked or terminated."""
    try:
        info = await js.consumer_info(STREAM, DURABLE)
    except Exception:
        return False  # not declared yet
    return info.ack_floor.stream_seq >= messages and info.num_ack_pending == 0 and info.num_pending == 0


def keepalive_tasks() -> list[str]:
    """Heartbeat and lease-renewal tasks still running in this loop (the service runs here too)."""
    names = {f"{DURABLE}-heartbeat", "lease-keeper"}
    return [task.get_name() for task in asyncio.all_tasks() if task.get_name() in names and not task.done()]


def recraft_env(image_env, recraft: FakeRecraft, **overrides: str) -> dict[str, str]:
    return image_env(
        PORTRAIT_PROVIDER="recraft",
        RECRAFT_API_KEY="k-test",
        RECRAFT_BASE_URL=recraft.api_base_url,
        ALLOW_PRIVATE_DOWNLOADS="true",
        **overrides,
    )


def key_of(story_id: str, attempt: int = 1) -> str:
    return f"portraits/{story_id}/{attempt}.png"


async def portrait_row(db, story_id: str, attempt: int = 1):
    return await db.fetchrow(
        "SELECT status, storage_id, error, deliveries FROM image.portraits WHERE story_id = $1 AND attempt = $2",
        uuid.UUID(story_id),
        attempt,
    )


async def stored_keys(s3, bucket: str) -> list[str]:
    answer = await s3.list_objects_v2(Bucket=bucket, Prefix="portraits/")
    return sorted(item["Key"] for item in answer.get("Contents", []))


async def read_object(s3, bucket: str, key: str) -> tuple[bytes, str]:
    answer = await s3.get_object(Bucket=bucket, Key=key)
    async with answer["Body"] as body:
        return await body.read(), answer["ContentType"]


def puts(s3_server, bucket: str, story_id: str = "") -> list[tuple[str, int]]:
    """Every PUT moto was sent for this test's portraits (or one story's)."""
    prefix = f"portraits/{story_id}" if story_id else "portraits/"
    return requests_to(s3_server.log_path, bucket, prefix)


async def one_put(s3_server, bucket: str, story_id: str) -> list[tuple[str, int]]:
    # moto writes its log line just after answering; wait for it, then it must be the only one.
    return await eventually(lambda: puts(s3_server, bucket, story_id), what="moto's log of the PUT")


# ---------------------------------------------------------------------------- the pipeline


async def test_event_is_painted_stored_and_attached_once(
    image_env, start_image, js, story_peer, s3, s3_bucket, s3_server, db
):
    await start_image(image_env())
    story_id = await new_story(js, story_peer, "a pale man in a straitjacket")

    await eventually(lambda: story_peer.images, what="SetStoryImage")
    key = key_of(story_id)
    assert story_peer.images == [(story_id, key)] and story_peer.image_attempts == [1]
    data, content_type = await read_object(s3, s3_bucket, key)
    assert data.startswith(PNG_MAGIC) and content_type == "image/png"
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.format == "PNG" and picture.size == (1024, 1024)
    await eventually(lambda: consumer_settled(js, 1), what="the ack")
    row = await portrait_row(db, story_id)
    assert (row["status"], row["storage_id"], row["deliveries"]) == ("READY", key, 1)
    assert story_peer.statuses == []
    assert await one_put(s3_server, s3_bucket, story_id) == [(f"/{s3_bucket}/{key}", 200)]
    # A first delivery's key is its own: no HEAD before the PUT (If-None-Match guards it).
    assert requests_to(s3_server.log_path, s3_bucket, f"portraits/{story_id}", method="HEAD") == []
    # The kept copy goes once the object is in S3.
    assert await db.fetchval("SELECT count(*) FROM image.portrait_results") == 0


async def test_same_event_twice_gives_one_object_and_one_attachment(
    image_env, start_image, js, story_peer, s3, s3_bucket, s3_server, db
):
    await start_image(image_env())
    story_id = story_peer.add("twins")

    # Different message ids, so JetStream keeps both: the image service must dedupe.
    await publish_story_created(js, story_id, msg_id=f"story.created:{story_id}:1")
    await publish_story_created(js, story_id, msg_id=f"story.created:{story_id}:1:again")

    await eventually(lambda: consumer_settled(js, 2), what="both events acked")
    assert story_peer.images == [(story_id, key_of(story_id))]
    assert await stored_keys(s3, s3_bucket) == [key_of(story_id)]
    assert len(await one_put(s3_server, s3_bucket, story_id)) == 1


async def test_forged_event_for_a_ready_story_changes_neither_object_nor_story(
    image_env, start_image, js, story_peer, s3, s3_bucket, s3_server, db
):
    await start_image(image_env())
    story_id = await new_story(js, story_peer, "the real prompt")
    await eventually(lambda: consumer_settled(js, 1), what="the real portrait")
    painted, _ = await read_object(s3, s3_bucket, key_of(story_id))
    story_before = dict(story_peer.stories[story_id])

    # Anyone who can publish to NATS: the same attempt again, a later one, another prompt.
    await publish_story_created(js, story_id, "a clown, obviously", attempt=1, msg_id="forged-1")
    await publish_story_created(js, story_id, "a clown, obviously", attempt=2, msg_id="forged-2")
    await eventually(lambda: consumer_settled(js, 3), what="the forged events acked")

    assert (await read_object(s3, s3_bucket, key_of(story_id)))[0] == painted
    assert await stored_keys(s3, s3_bucket) == [key_of(story_id)]
    assert len(puts(s3_server, s3_bucket, story_id)) == 1
    assert story_peer.stories[story_id] == story_before
    assert story_peer.images == [(story_id, key_of(story_id))] and story_peer.statuses == []
    assert await db.fetchval("SELECT count(*) FROM image.portraits WHERE story_id = $1", uuid.UUID(story_id)) == 1


async def test_events_for_a_stale_attempt_or_an_unknown_story_paint_nothing(
    image_env, start_image, js, story_peer, s3, s3_bucket, db
):
    await start_image(image_env())
    retried = story_peer.add("painted again", attempt=2)
    await publish_story_created(js, retried, attempt=1)  # the first attempt's event, replayed
    await publish_story_created(js, str(uuid.uuid4()), "nobody", attempt=1)

    await eventually(lambda: consumer_settled(js, 2), what="both acked")
    assert story_peer.images == [] and story_peer.statuses == []
    assert await stored_keys(s3, s3_bucket) == []
    assert await db.fetchval("SELECT count(*) FROM image.portraits") == 0


async def test_a_story_that_moved_on_mid_paint_refuses_the_image_and_that_is_final(
    image_env, start_image, js, story_peer, db
):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.delay_seconds = 0.5
        await start_image(recraft_env(image_env, recraft))
        story_id = await new_story(js, story_peer, "the retried one")
        await eventually(lambda: recraft.requests, what="the provider call")
        story_peer.stories[story_id]["attempt"] = 2  # an operator's RetryPortrait, meanwhile

        await eventually(lambda: consumer_settled(js, 1), what="the ack")
        info = await js.consumer_info(STREAM, DURABLE)
        assert info.num_redelivered == 0  # FAILED_PRECONDITION (a stale attempt) is not retried
        assert story_peer.images == [] and story_peer.statuses == []
        row = await portrait_row(db, story_id)
        assert row["status"] == "FAILED" and "FAILED_PRECONDITION" in row["error"]


async def test_blank_prompt_is_skipped(image_env, start_image, js, story_peer, s3, s3_bucket, db):
    await start_image(image_env())
    story_id = await new_story(js, story_peer, "  \n\t ")

    await eventually(lambda: story_peer.statuses, what="SetPortraitStatus")
    assert story_peer.statuses == [
        (story_id, story_service_pb2.PORTRAIT_STATUS_SKIPPED, "image_generation_prompt is blank")
    ]
    await eventually(lambda: consumer_settled(js, 1), what="the ack")
    assert story_peer.images == []
    assert await stored_keys(s3, s3_bucket) == []
    assert (await portrait_row(db, story_id))["status"] == "SKIPPED"


async def test_recraft_without_key_marks_failed_and_acks(image_env, start_image, js, story_peer, db):
    await start_image(image_env(PORTRAIT_PROVIDER="recraft"))
    story_id = await new_story(js, story_peer, "a nurse with no face")

    await eventually(lambda: story_peer.statuses, what="SetPortraitStatus")
    [(failed_id, status, reason)] = story_peer.statuses
    assert (failed_id, status) == (story_id, story_service_pb2.PORTRAIT_STATUS_FAILED)
    assert "RECRAFT_API_KEY" in reason
    await eventually(lambda: consumer_settled(js, 1), what="the ack")
    info = await js.consumer_info(STREAM, DURABLE)
    assert info.num_redelivered == 0  # a missing key is not retried
    row = await portrait_row(db, story_id)
    assert (row["status"], row["deliveries"]) == ("FAILED", 1)


async def test_recraft_portrait_is_downloaded_and_stored_as_png(image_env, start_image, js, story_peer, s3, s3_bucket):
    async with FakeRecraft(api_key="k-test") as recraft:
        await start_image(recraft_env(image_env, recraft))
        recraft.fail_next(1, status=503)  # one transient failure: retried by a redelivery

        story_id = await new_story(js, story_peer, "the ward at night")

        await eventually(lambda: story_peer.images, what="SetStoryImage")
        generations = recraft.requests_to("/v1/images/generations")
        assert len(generations) == 2
        assert generations[-1].json()["prompt"] == "the ward at night"
        data, _ = await read_object(s3, s3_bucket, key_of(story_id))
        assert data.startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("status", "message"),
    [(400, "Prompt violates the content policy"), (401, "Invalid API token")],
)
async def test_a_permanent_provider_error_fails_at_once_without_redelivery(
    image_env, start_image, js, story_peer, db, status, message
):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.fail_next(1, status=status, message=message)
        await start_image(recraft_env(image_env, recraft))
        story_id = await new_story(js, story_peer, "forbidden")

        await eventually(lambda: story_peer.statuses, what="SetPortraitStatus")
        [(_, reported, reason)] = story_peer.statuses
        assert reported == story_service_pb2.PORTRAIT_STATUS_FAILED
        assert f"HTTP {status}" in reason and message in reason
        await eventually(lambda: consumer_settled(js, 1), what="the ack")
        info = await js.consumer_info(STREAM, DURABLE)
        assert info.num_redelivered == 0 and info.delivered.consumer_seq == 1
        assert len(recraft.generation_requests()) == 1
        assert (await portrait_row(db, story_id))["status"] == "FAILED"


async def test_retry_after_of_a_429_is_honoured_by_the_redelivery(image_env, start_image, js, story_peer):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.fail_next(1, status=429, message="slow down", headers={"Retry-After": "2"})
        await start_image(recraft_env(image_env, recraft))  # the consumer's own backoff is 0.2 s
        await new_story(js, story_peer, "patience")

        await eventually(lambda: story_peer.images, what="the portrait after the wait")
        first, second = recraft.generation_requests()
        assert second.received_at - first.received_at >= 2.0


async def test_transient_failures_until_the_last_delivery_mark_failed(image_env, start_image, js, story_peer, db):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.fail_next(100, status=503)
        await start_image(recraft_env(image_env, recraft, PORTRAIT_MAX_DELIVER="2"))
        story_id = await new_story(js, story_peer, "the basement")

        await eventually(lambda: story_peer.statuses, what="SetPortraitStatus")
        [(_, status, reason)] = story_peer.statuses
        assert status == story_service_pb2.PORTRAIT_STATUS_FAILED
        assert reason.startswith("gave up after 2 deliveries") and "503" in reason
        await eventually(lambda: consumer_settled(js, 1), what="the final ack")
        row = await portrait_row(db, story_id)
        assert (row["status"], row["deliveries"]) == ("FAILED", 2)
        assert story_peer.images == []
        assert keepalive_tasks() == []  # failed deliveries stop their heartbeats too


async def test_transient_provider_failures_stop_at_the_attempt_budget(image_env, start_image, js, story_peer, db):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.fail_next(100, status=503)
        await start_image(
            recraft_env(image_env, recraft, PORTRAIT_ATTEMPT_BUDGET_SECONDS="1", PORTRAIT_MAX_DELIVER="50")
        )
        story_id = await new_story(js, story_peer, "the endless corridor")

        await eventually(lambda: story_peer.statuses, what="SetPortraitStatus")
        [(_, status, reason)] = story_peer.statuses
        assert status == story_service_pb2.PORTRAIT_STATUS_FAILED and "503" in reason
        await eventually(lambda: consumer_settled(js, 1), what="the final ack")
        row = await portrait_row(db, story_id)
        assert row["status"] == "FAILED" and 2 <= row["deliveries"] < 50


# ---------------------------------------------------------------------------- the provider is paid once


async def test_s3_down_for_three_deliveries_pays_the_provider_once(
    image_env, start_image, js, story_peer, s3, s3_bucket, s3_server, db
):
    async with FakeRecraft(api_key="k-test") as recraft, TcpProxy(s3_server.host, s3_server.port) as proxy:
        await proxy.cut()  # down before start-up too: the service must start anyway
        await start_image(recraft_env(image_env, recraft, S3_ENDPOINT_URL=proxy.url))
        story_id = await new_story(js, story_peer, "the orderly")

        async def three_deliveries() -> bool:
            row = await portrait_row(db, story_id)
            return row is not None and row["deliveries"] >= 3

        await eventually(three_deliveries, what="three deliveries while S3 is down")
        row = await portrait_row(db, story_id)
        assert row["status"] == "GENERATED" and "object storage" in row["error"]
        assert story_peer.images == []

        await proxy.restore()
        await eventually(lambda: story_peer.images, what="SetStoryImage after S3 came back")
        assert story_peer.images == [(story_id, key_of(story_id))]
        assert len(recraft.generation_requests()) == 1
        assert await stored_keys(s3, s3_bucket) == [key_of(story_id)]
        assert len(await one_put(s3_server, s3_bucket, story_id)) == 1
        await eventually(lambda: consumer_settled(js, 1), what="the ack")


async def test_story_down_after_upload_reuses_the_stored_object(
    image_env, start_image, js, story_peer, s3, s3_bucket, s3_server, db
):
    story_peer.unavailable_next = 2
    await start_image(image_env())
    story_id = await new_story(js, story_peer, "the matron")

    await eventually(lambda: story_peer.images, what="SetStoryImage once story is back")
    assert story_peer.images == [(story_id, key_of(story_id))]
    await eventually(lambda: consumer_settled(js, 1), what="the ack")
    row = await portrait_row(db, story_id)
    assert (row["status"], row["deliveries"]) == ("READY", 3)
    assert await stored_keys(s3, s3_bucket) == [key_of(story_id)]
    assert len(await one_put(s3_server, s3_bucket, story_id)) == 1


async def test_story_down_after_upload_records_stored_and_the_redelivery_only_attaches(
    image_env, start_image, js, story_peer, s3, s3_bucket, s3_server, db
):
    """STORED is written only when the story cannot be told: then the redelivery neither
    paints nor uploads nor checks S3 again, it only attaches."""
    story_peer.unavailable_next = 10_000
    await start_image(image_env())
    story_id = await new_story(js, story_peer, "the night porter")
    key = key_of(story_id)

    async def stored() -> bool:
        row = await portrait_row(db, story_id)
        # The release that follows records why; wait for it too.
        return row is not None and row["status"] == "STORED" and row["error"] is not None

    await eventually(stored, what="STORED after the story refused the attach")
    row = await portrait_row(db, story_id)
    assert row["storage_id"] == key and "UNAVAILABLE" in row["error"]
    story_peer.unavailable_next = 0

    await eventually(lambda: story_peer.images, what="SetStoryImage once story is back")
    assert story_peer.images == [(story_id, key)]
    await eventually(lambda: consumer_settled(js, 1), what="the ack")
    row = await portrait_row(db, story_id)
    assert (row["status"], row["storage_id"], row["error"]) == ("READY", key, None)
    assert len(await one_put(s3_server, s3_bucket, story_id)) == 1
    assert requests_to(s3_server.log_path, s3_bucket, f"portraits/{story_id}", method="HEAD") == []


async def test_undecodable_event_is_terminated_and_the_next_one_painted(image_env, start_image, js, story_peer):
    await start_image(image_env())
    await js.publish("story.created", b"\xff\x00 not a protobuf", headers=msg_id_headers("garbage-1"))
    await publish_story_created(js, "not-a-uuid", "x", msg_id="garbage-2")
    story_id = await new_story(js, story_peer, "the visitor")

    await eventually(lambda: story_peer.images, what="the valid event painted")
    await eventually(lambda: consumer_settled(js, 3), what="all three settled")
    info = await js.consumer_info(STREAM, DURABLE)
    assert info.num_redelivered == 0  # terminated, never retried
    assert story_peer.images == [(story_id, key_of(story_id))]
    assert story_peer.statuses == []


# ---------------------------------------------------------------------------- NATS faults


async def test_consumer_survives_a_nats_restart(image_env, start_image, nats_server, story_peer):
    await start_image(image_env())
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await eventually(lambda: consumer_settled(js, 0), what="the consumer declared")
        first = await new_story(js, story_peer, "before the outage")
        await eventually(lambda: len(story_peer.images) == 1, what="the first portrait")

        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)

        await eventually(lambda: nc.is_connected, what="the test client reconnected")
        second = await new_story(js, story_peer, "after the outage")
        await eventually(lambda: len(story_peer.images) == 2, timeout=15, what="the second portrait")
        assert [story for story, _ in story_peer.images] == [first, second]
    finally:
        await nc.close()


async def test_service_starts_while_nats_is_down_and_paints_once_it_is_up(
    image_env, start_image, nats_server, story_peer
):
    await asyncio.to_thread(nats_server.stop)
    server = await start_image(image_env())
    assert server.port > 0

    await asyncio.to_thread(nats_server.start)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, STORY_EVENTS)
        await new_story(js, story_peer, "late arrival")
        await eventually(lambda: story_peer.images, timeout=15, what="the portrait")
    finally:
        await nc.close()


async def test_stopping_mid_paint_hands_the_event_to_another_process(image_env, js, story_peer, db):
    """Two image processes share the durable; one stops mid-portrait, the other finishes it."""
    async with FakeRecraft(api_key="k-test") as recraft:
        env = recraft_env(
            image_env,
            recraft,
            # The ack wait (15 s) is beyond this test's timeouts: only a nak on shutdown and
            # a released lease can bring the event back in time.
            PORTRAIT_ACK_WAIT_SECONDS="15",
            PORTRAIT_SHUTDOWN_GRACE_SECONDS="0.2",
        )
        recraft.delay_seconds = 60
        async with contextlib.AsyncExitStack() as first_process:
            await build(Config.from_env(env), first_process)
            story_id = await new_story(js, story_peer, "the night porter")
            await eventually(lambda: recraft.requests, what="the first process calling the provider")
        assert keepalive_tasks() == []  # a cancelled paint stops its heartbeat and lease renewal

        recraft.delay_seconds = 0
        async with contextlib.AsyncExitStack() as second_process:
            await build(Config.from_env(env), second_process)
            await eventually(lambda: story_peer.images, timeout=8, what="the second process painting it")
            assert story_peer.images == [(story_id, key_of(story_id))]
            await eventually(lambda: consumer_settled(js, 1), what="the ack")
        row = await portrait_row(db, story_id)
        assert (row["status"], row["deliveries"]) == ("READY", 2)


# ---------------------------------------------------------------------------- heartbeats and leases

# A paint of a few ack waits: the fake answers the generation call and the download
# each after this delay.
SLOW_PROVIDER_DELAY_S = 2.5
SHORT_ACK_WAIT = {"PORTRAIT_ACK_WAIT_SECONDS": "1"}


async def test_live_worker_keeps_its_message_past_the_ack_wait(image_env, start_image, js, story_peer, db):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.delay_seconds = SLOW_PROVIDER_DELAY_S
        await start_image(recraft_env(image_env, recraft, **SHORT_ACK_WAIT))
        story_id = await new_story(js, story_peer, "the long night shift")

        await eventually(lambda: story_peer.images, timeout=15, what="the slow portrait")
        await eventually(lambda: consumer_settled(js, 1), what="the ack")
        info = await js.consumer_info(STREAM, DURABLE)
        assert info.config.ack_wait == 1  # the setting reached JetStream
        # ~5 s of painting against a 1 s ack wait, and delivered once: never handed to anyone else.
        assert info.delivered.consumer_seq == 1
        assert len(recraft.generation_requests()) == 1
        row = await portrait_row(db, story_id)
        assert (row["status"], row["deliveries"]) == ("READY", 1)
        assert keepalive_tasks() == []  # stopped once the work ended


async def test_lease_is_renewed_while_a_slow_paint_runs(image_env, start_image, js, story_peer, db):
    """A duplicate event arriving after the first lease would have run out is still turned away."""
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.delay_seconds = SLOW_PROVIDER_DELAY_S
        await start_image(recraft_env(image_env, recraft, **SHORT_ACK_WAIT))
        story_id = story_peer.add("the sleepwalker")
        await publish_story_created(js, story_id, msg_id=f"story.created:{story_id}:1")
        await eventually(lambda: recraft.requests, what="the provider call")

        # The claim's lease is ack wait + 2 s = 3 s; look after that, while still painting.
        lease = await _lease_after(db, story_id, seconds_after_claim=3.3)
        assert lease["status"] == "PENDING" and lease["lease_until"] > lease["now"]
        await publish_story_created(js, story_id, msg_id=f"story.created:{story_id}:1:again")

        await eventually(lambda: consumer_settled(js, 2), timeout=15, what="both events settled")
        assert len(recraft.generation_requests()) == 1
        assert story_peer.images == [(story_id, key_of(story_id))]


async def test_slow_s3_never_lets_two_workers_paint_one_attempt(image_env, js, story_peer, s3_server, s3_bucket, db):
    """Each S3 chunk takes 0.3 s against a 1 s ack wait and lease renewal every second: the
    upload spans several leases, and a duplicate delivery to a second process arrives
    meanwhile. One provider call, one PUT, one attachment."""
    async with (
        FakeRecraft(api_key="k-test") as recraft,
        TcpProxy(s3_server.host, s3_server.port) as slow_s3,
        contextlib.AsyncExitStack() as processes,
    ):
        recraft.image_size = (1024, 1024)
        env = recraft_env(image_env, recraft, S3_ENDPOINT_URL=slow_s3.url, **SHORT_ACK_WAIT)
        for _ in range(2):
            await build(Config.from_env(env), processes)
        story_id = story_peer.add("the slow archive")
        slow_s3.delay_seconds = 0.3
        await publish_story_created(js, story_id, msg_id=f"story.created:{story_id}:1")

        # The picture goes straight to S3 once the provider answered: the upload is under way.
        await eventually(lambda: recraft.generation_requests(), what="the provider answered, the upload under way")
        await publish_story_created(js, story_id, msg_id=f"story.created:{story_id}:1:again")
        await eventually(lambda: consumer_settled(js, 2), timeout=40, what="both deliveries settled")

        assert story_peer.images == [(story_id, key_of(story_id))]
        assert len(recraft.generation_requests()) == 1
        assert len(await one_put(s3_server, s3_bucket, story_id)) == 1
        assert (await portrait_row(db, story_id))["status"] == "READY"


async def test_nats_outage_mid_paint_neither_stops_nor_repeats_the_portrait(
    image_env, start_image, js, nats_server, story_peer, s3, s3_bucket, db
):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.delay_seconds = SLOW_PROVIDER_DELAY_S
        await start_image(recraft_env(image_env, recraft, **SHORT_ACK_WAIT))
        story_id = await new_story(js, story_peer, "the generator room")
        await eventually(lambda: recraft.requests, what="the provider call")

        # Longer than the ack wait: heartbeats cannot reach the server, which may redeliver.
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(2)  # the outage itself, not a synchronisation
        await asyncio.to_thread(nats_server.start)

        await eventually(lambda: story_peer.images, timeout=15, what="the portrait after the outage")
        assert story_peer.images == [(story_id, key_of(story_id))]
        assert len(recraft.generation_requests()) == 1
        assert await stored_keys(s3, s3_bucket) == [key_of(story_id)]
        nc = await nats.connect(nats_server.url)
        try:
            await eventually(lambda: consumer_settled(nc.jetstream(), 1), timeout=15, what="the ack")
        finally:
            await nc.close()
        assert (await portrait_row(db, story_id))["status"] == "READY"


async def _lease_after(db, story_id: str, *, seconds_after_claim: float):
    """The portrait row's lease, read once the claim is `seconds_after_claim` old."""
    row = await db.fetchrow(
        "SELECT create_time, now() AS now FROM image.portraits WHERE story_id = $1", uuid.UUID(story_id)
    )
    age = (row["now"] - row["create_time"]).total_seconds()
    await asyncio.sleep(max(seconds_after_claim - age, 0))
    return await db.fetchrow(
        "SELECT status, lease_until, now() AS now FROM image.portraits WHERE story_id = $1", uuid.UUID(story_id)
    )


# ---------------------------------------------------------------------------- scale-out


async def test_portraits_in_backoff_do_not_stall_the_next_one(image_env, start_image, js, story_peer):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.fail_prompts["TRANSIENT"] = (503, {})
        # A long redelivery delay: the six failing portraits sit in backoff for the whole test.
        await start_image(recraft_env(image_env, recraft, PORTRAIT_REDELIVERY_BACKOFF_SECONDS="60"))
        for number in range(6):
            await new_story(js, story_peer, f"TRANSIENT patient {number}")
        await eventually(lambda: len(recraft.generation_requests("TRANSIENT")) == 6, what="six first failures")

        healthy = await new_story(js, story_peer, "the one that works")

        await eventually(lambda: story_peer.images, timeout=10, what="the seventh portrait")
        assert story_peer.images == [(healthy, key_of(healthy))]


async def test_a_second_process_doubles_the_portraits_in_flight(image_env, js, story_peer):
    async with FakeRecraft(api_key="k-test") as recraft, contextlib.AsyncExitStack() as processes:
        recraft.delay_seconds = 0.5  # a provider that takes a while per image
        env = recraft_env(image_env, recraft, PORTRAIT_CONCURRENCY="2")
        await build(Config.from_env(env), processes)
        for number in range(6):
            await new_story(js, story_peer, f"first wave {number}")
        await eventually(lambda: len(story_peer.images) == 6, timeout=20, what="the first wave")
        one_process = recraft.max_in_flight

        await build(Config.from_env(env), processes)
        recraft.max_in_flight = 0
        for number in range(12):
            await new_story(js, story_peer, f"second wave {number}")
        await eventually(lambda: len(story_peer.images) == 18, timeout=20, what="the second wave")

        assert one_process == 2
        assert recraft.max_in_flight == 4


async def test_a_long_backlog_waits_its_turn_and_is_not_failed(image_env, start_image, js, story_peer):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.delay_seconds = 0.2
        # One slot, two deliveries at most, a 1 s ack wait: a message fetched early and left
        # waiting would run out of deliveries; waiting in the stream costs none.
        await start_image(
            recraft_env(image_env, recraft, PORTRAIT_CONCURRENCY="1", PORTRAIT_MAX_DELIVER="2", **SHORT_ACK_WAIT)
        )
        ids = [await new_story(js, story_peer, f"backlog {number}") for number in range(8)]

        await eventually(lambda: len(story_peer.images) == 8, timeout=40, what="the whole backlog")
        assert sorted(story for story, _ in story_peer.images) == sorted(ids)
        assert story_peer.statuses == []


# ---------------------------------------------------------------------------- nothing stays PENDING


async def test_database_down_through_every_delivery_still_ends_the_portrait_failed(
    image_env, start_image, js, story_peer, database_url, db
):
    """Even recording the failure was impossible on the last delivery: JetStream's
    out-of-deliveries advisory, kept in a stream, ends the portrait once the database is back."""
    parts = urlsplit(database_url)
    async with TcpProxy(parts.hostname, parts.port or 5432) as db_proxy:
        proxied = urlunsplit(parts._replace(netloc=f"{parts.username}@{db_proxy.address}"))
        await start_image(image_env(DATABASE_URL=proxied, PORTRAIT_MAX_DELIVER="3"))
        await eventually(lambda: consumer_settled(js, 0), what="the consumer declared")
        await db_proxy.cut()
        story_id = await new_story(js, story_peer, "the file room")

        async def dead_lettered() -> bool:
            try:
                return (await js.stream_info("PORTRAIT_DEAD_LETTERS")).state.messages == 1
            except Exception:
                return False

        await eventually(dead_lettered, timeout=20, what="the deliveries running out")
        assert story_peer.statuses == [] and await portrait_row(db, story_id) is None

        await db_proxy.restore()
        await eventually(lambda: story_peer.statuses, timeout=30, what="the portrait ended")
        [(_, status, reason)] = story_peer.statuses
        assert status == story_service_pb2.PORTRAIT_STATUS_FAILED
        assert "no delivery left" in reason

        async def recorded() -> bool:  # recorded here right after the story was told
            return (await portrait_row(db, story_id))["status"] == "FAILED"

        await eventually(recorded, what="the failure recorded")


# ---------------------------------------------------------------------------- metrics


async def test_metrics_count_a_retried_portrait_its_steps_and_its_deliveries(image_env, start_image, js, story_peer):
    async with FakeRecraft(api_key="k-test") as recraft:
        recraft.fail_next(1, status=503, message="overloaded")
        server = await start_image(recraft_env(image_env, recraft, METRICS_ADDR="127.0.0.1:0"))
        before = await scrape(server.metrics.url)
        await new_story(js, story_peer, "a patient who waits")
        await eventually(lambda: story_peer.images, what="the portrait after one retry")
        await eventually(lambda: consumer_settled(js, 1), what="the delivery acked")
        after = await scrape(server.metrics.url)
        info = await js.consumer_info(STREAM, DURABLE)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    provider = {"kind": "image", "provider": "recraft"}
    assert moved("casefile_provider_retries_total", **provider, reason="overloaded") == 1
    assert moved("casefile_provider_call_seconds_count", **provider, outcome="transient_error") == 1
    assert moved("casefile_provider_call_seconds_count", **provider, outcome="ok") == 1
    assert moved("casefile_portrait_step_seconds_count", step="generate", outcome="error") == 1
    assert moved("casefile_portrait_step_seconds_count", step="generate", outcome="ok") == 1
    assert moved("casefile_portrait_step_seconds_count", step="attach", outcome="ok") == 1
    assert moved("casefile_portrait_deliveries_total", outcome="retry") == 1
    assert moved("casefile_portrait_deliveries_total", outcome="READY") == 1
    assert moved("casefile_portraits_finished_total", outcome="READY") == 1
    assert moved("casefile_consumer_deliveries_total", consumer=DURABLE, verdict="retry") == 1
    assert moved("casefile_consumer_deliveries_total", consumer=DURABLE, verdict="ack") == 1
    assert moved("casefile_consumer_redeliveries_total", consumer=DURABLE) == 1
    # What JetStream itself says, asked at the scrape.
    assert after.value("casefile_consumer_pending_messages", consumer=DURABLE) == info.num_pending == 0
    assert after.value("casefile_consumer_ack_pending_messages", consumer=DURABLE) == info.num_ack_pending == 0
    assert after.value("casefile_consumer_in_flight", consumer=DURABLE) == 0


async def test_consumer_pending_is_read_from_jetstream_at_each_scrape(image_env, start_image, js, story_peer):
    server = await start_image(image_env(METRICS_ADDR="127.0.0.1:0", PORTRAIT_CONCURRENCY="1"))
    await eventually(lambda: consumer_settled(js, 0), what="the consumer declared")
    blocked = asyncio.Event()
    story_peer.block_get_story = blocked  # GetStory waits: the first message stays in work
    for _ in range(3):
        await new_story(js, story_peer, "a queue")

    async def pending() -> bool:
        scraped = await scrape(server.metrics.url)
        return (
            scraped.value("casefile_consumer_pending_messages", consumer=DURABLE) == 2
            and scraped.value("casefile_consumer_in_flight", consumer=DURABLE) == 1
        )

    await eventually(pending, what="two messages waiting behind one in work")
    blocked.set()
    await eventually(lambda: consumer_settled(js, 3), what="all three painted")
    scraped = await scrape(server.metrics.url)
    assert scraped.value("casefile_consumer_pending_messages", consumer=DURABLE) == 0

"""Real faults against the three services running as processes.

S3 is cut behind a TCP proxy, the NATS server is stopped, the story process is SIGKILLed
with events still in its outbox, an event is delivered three times, and processes are
started with bad settings. Each test then checks what must hold: stories answered at once,
every portrait READY in the end, one object per story, one SetStoryImage effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import aiobotocore.session
import asyncpg
import grpc
import nats
import pytest

from casefile.story.v1 import story_events_pb2
from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from shared.auth import bearer_metadata
from tests.fakes.tcp_proxy import TcpProxy
from tools.infra import FAST_RECONNECT, MotoS3Server, NatsServer, ServiceProcess, free_port
from tests.case_files import case_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# Fast enough that a restored dependency is used within a second, not minutes.
FAST_PIPELINE = {
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
    "PORTRAIT_REDELIVERY_BACKOFF_SECONDS": "0.5,1,1,1,1,1,1,1,1,1,1,1",
    "PORTRAIT_MAX_DELIVER": "40",
}
SERVICES = ("credits", "story", "image")
STREAM = "STORY_EVENTS"
DURABLE = "image-portraits"
CALL_TIMEOUT_S = 10.0
PORTRAIT_TIMEOUT_S = 30.0
# Long enough for several redeliveries against the dead dependency.
OUTAGE_S = 3.0
POLL_S = 0.1
NOT_PAINTED = {pb.PORTRAIT_STATUS_FAILED, pb.PORTRAIT_STATUS_SKIPPED}


# ---------------------------------------------------------------------------- helpers


def address_of(env: dict[str, str], service: str) -> str:
    return env[f"{service.upper()}_ADDR"]


async def start_healthy(
    start_service: Callable[..., ServiceProcess], env: dict[str, str], services: Iterable[str] = SERVICES
) -> dict[str, ServiceProcess]:
    """Start the processes together (they find each other by address), wait until all serve."""
    processes = {name: start_service(name, env) for name in services}
    await asyncio.gather(*(process.wait_healthy(address_of(env, name)) for name, process in processes.items()))
    return processes


def log_events(process: ServiceProcess) -> list[dict]:
    """Every JSON line this process wrote (each process has a log file of its own)."""
    if not process.log_path.exists():
        return []
    events = []
    for line in process.log_path.read_text(errors="replace").splitlines():
        # A running process may be half-way through its last line.
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return [event for event in events if isinstance(event, dict)]


def events_for(process: ServiceProcess, event: str, story_id: str, **fields: str) -> list[dict]:
    return [
        line
        for line in log_events(process)
        if line.get("event") == event
        and line.get("story_id") == story_id
        and all(line.get(key) == value for key, value in fields.items())
    ]


async def wait_for_exit(process: ServiceProcess, timeout: float) -> int | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.is_running() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return process.returncode


@dataclass
class StoryClient:
    stub: story_service_pb2_grpc.StoryServiceStub
    metadata: tuple

    async def generate(self, user_id: str) -> pb.Story:
        reply = await self.stub.GenerateStory(
            pb.GenerateStoryRequest(user_id=user_id, request_id=uuid.uuid4().hex),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT_S,
        )
        return reply.story

    async def get(self, story_id: str) -> pb.Story:
        request = pb.GetStoryRequest(story_id=story_id)
        return (await self.stub.GetStory(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)).story

    async def get_all(self, story_ids: list[str]) -> dict[str, pb.Story] | None:
        """Every story by id, or None while the story service is away (being restarted)."""
        try:
            return {story.story_id: story for story in await asyncio.gather(*map(self.get, story_ids))}
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None

    async def statuses(self, story_ids: list[str]) -> set[int]:
        return {story.portrait_status for story in (await self.get_all(story_ids) or {}).values()}

    async def wait_ready(self, story_ids: Iterable[str], timeout: float = PORTRAIT_TIMEOUT_S) -> dict[str, pb.Story]:
        """Polls GetStory until every portrait is READY; fails at once on FAILED or SKIPPED."""
        story_ids = list(story_ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stories = await self.get_all(story_ids)
            if stories is not None:
                unpainted = {sid: story for sid, story in stories.items() if story.portrait_status in NOT_PAINTED}
                assert not unpainted, f"portraits ended without a picture: {unpainted}"
                if all(story.portrait_status == pb.PORTRAIT_STATUS_READY for story in stories.values()):
                    return stories
            if loop.time() > deadline:
                pytest.fail(f"portraits not READY within {timeout:g} s: {describe(stories)}")
            await asyncio.sleep(POLL_S)


def describe(stories: dict[str, pb.Story] | None) -> str:
    if stories is None:
        return "the story service is unavailable"
    return ", ".join(f"{sid}: {pb.PortraitStatus.Name(story.portrait_status)}" for sid, story in stories.items())


@pytest.fixture
def env(make_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return make_env(**FAST_PIPELINE)


@pytest.fixture
async def stories(env: dict[str, str], auth_tokens: dict[str, str]) -> AsyncIterator[StoryClient]:
    """A client of the story service; it reconnects quickly when the process is replaced."""
    async with grpc.aio.insecure_channel(address_of(env, "story"), options=FAST_RECONNECT) as channel:
        yield StoryClient(story_service_pb2_grpc.StoryServiceStub(channel), bearer_metadata(auth_tokens["gateway"]))


@pytest.fixture
async def s3(s3_endpoint_url: str) -> AsyncIterator:
    """The test's own S3 client, straight to moto (never through a proxy under test)."""
    session = aiobotocore.session.get_session()
    async with session.create_client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1") as client:
        yield client


async def portrait_keys(s3, bucket: str) -> list[str]:
    answer = await s3.list_objects_v2(Bucket=bucket, Prefix="portraits/")
    return sorted(item["Key"] for item in answer.get("Contents", []))


def keys_of(story_ids: Iterable[str]) -> list[str]:
    return sorted(f"portraits/{story_id}/1.png" for story_id in story_ids)


def assert_stored_once(stories: dict[str, pb.Story], keys: list[str]) -> None:
    for story_id, story in stories.items():
        assert story.storage_id == f"portraits/{story_id}/1.png"
    assert keys == keys_of(stories), "the bucket must hold exactly one object per story"


async def stop_nats(server: NatsServer) -> None:
    await asyncio.to_thread(server.stop, 5.0)


async def start_nats(server: NatsServer) -> None:
    # Same port, same store directory: streams and the durable consumer come back with it.
    await asyncio.to_thread(server.start)


# ---------------------------------------------------------------------------- a. S3 down


async def test_s3_outage_delays_portraits_and_loses_none(
    env, start_service, s3_server: MotoS3Server, s3_bucket, s3, stories: StoryClient
):
    async with TcpProxy(s3_server.host, s3_server.port) as proxy:
        env = {**env, "S3_ENDPOINT_URL": proxy.url}
        processes = await start_healthy(start_service, env)
        before = await stories.generate("u-before")
        await stories.wait_ready([before.story_id])  # the image service reaches S3 through the proxy

        await proxy.cut()
        during = [await stories.generate(f"u-outage-{n}") for n in range(3)]
        assert all(story.story_id and story.chapters for story in during)
        assert {story.portrait_status for story in during} == {pb.PORTRAIT_STATUS_PENDING}
        await asyncio.sleep(OUTAGE_S)
        during_ids = [story.story_id for story in during]
        assert await stories.statuses(during_ids) == {pb.PORTRAIT_STATUS_PENDING}
        # The upload itself failed (not merely "not yet attempted"): the outage was real.
        assert any(events_for(processes["image"], "portrait.step_failed", sid, step="upload") for sid in during_ids)
        assert await portrait_keys(s3, s3_bucket) == keys_of([before.story_id])

        await proxy.restore()
        ready = await stories.wait_ready(during_ids)

    ready[before.story_id] = await stories.get(before.story_id)
    assert_stored_once(ready, await portrait_keys(s3, s3_bucket))


# ---------------------------------------------------------------------------- b. NATS down


async def test_nats_outage_delays_portraits_and_loses_none(
    env, start_service, nats_server: NatsServer, s3_bucket, s3, stories: StoryClient
):
    await start_healthy(start_service, env)
    before = await stories.generate("u-before")
    await stories.wait_ready([before.story_id])

    await stop_nats(nats_server)
    during = [await stories.generate(f"u-outage-{n}") for n in range(3)]
    during_ids = [story.story_id for story in during]
    await asyncio.sleep(1.0)
    assert await stories.statuses(during_ids) == {pb.PORTRAIT_STATUS_PENDING}

    await start_nats(nats_server)
    ready = await stories.wait_ready(during_ids)

    ready[before.story_id] = await stories.get(before.story_id)
    assert_stored_once(ready, await portrait_keys(s3, s3_bucket))


# ---------------------------------------------------------------------------- c. story killed


async def unpublished_outbox_rows(database_url: str, story_ids: list[str]) -> int:
    """Read straight from the story's schema: the test checks what the crash left behind."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM story.outbox WHERE story_id = ANY($1::uuid[]) AND published_at IS NULL",
            [uuid.UUID(story_id) for story_id in story_ids],
        )
    finally:
        await conn.close()


async def test_story_killed_with_unpublished_events_publishes_them_after_restart(
    env, start_service, nats_server: NatsServer, s3_bucket, s3, stories: StoryClient, database_url
):
    processes = await start_healthy(start_service, env)
    before = await stories.generate("u-before")
    await stories.wait_ready([before.story_id])

    await stop_nats(nats_server)
    during = [await stories.generate(f"u-crash-{n}") for n in range(3)]
    during_ids = [story.story_id for story in during]
    assert processes["story"].kill() == -signal.SIGKILL  # no shutdown code runs, nothing is flushed
    assert await unpublished_outbox_rows(database_url, during_ids) == 3, "the events should wait in the outbox"
    await start_nats(nats_server)

    restarted = start_service("story", env)
    await restarted.wait_healthy(address_of(env, "story"))
    ready = await stories.wait_ready(during_ids)

    assert await unpublished_outbox_rows(database_url, during_ids) == 0
    for story_id in during_ids:
        published = [line for line in log_events(restarted) if line.get("event") == "outbox.step_succeeded" and line.get("step") == "publish"]
        assert any(line.get("msg_id") == f"story.created:{story_id}:1" for line in published), (
            f"the new process did not publish {story_id}"
        )
    ready[before.story_id] = await stories.get(before.story_id)
    assert_stored_once(ready, await portrait_keys(s3, s3_bucket))


# ---------------------------------------------------------------------------- d. redelivery


def story_content() -> pb.StoryContent:
    return case_file()


def story_created(story: pb.Story) -> bytes:
    """The event the outbox publishes for a new story, byte for byte the same fields."""
    return story_events_pb2.StoryCreated(
        story_id=story.story_id,
        user_id=story.user_id,
        image_generation_prompt=story.image_generation_prompt,
        create_time=story.create_time,
        portrait_attempt=1,
    ).SerializeToString()


async def consumer_settled(js, last_seq: int) -> bool:
    """Every message up to `last_seq` was acknowledged and nothing waits for redelivery."""
    info = await js.consumer_info(STREAM, DURABLE)
    return info.ack_floor.stream_seq >= last_seq and info.num_ack_pending == 0 and info.num_pending == 0


async def test_duplicate_deliveries_store_one_object_and_attach_it_once(
    env, start_service, nats_server: NatsServer, s3_bucket, s3, stories: StoryClient
):
    processes = await start_healthy(start_service, env, ("story", "image"))
    created = (
        await stories.stub.CreateStory(
            pb.CreateStoryRequest(user_id="u-redelivery", content=story_content(), request_id="r1"),
            metadata=stories.metadata,
            timeout=CALL_TIMEOUT_S,
        )
    ).story
    story_id = created.story_id

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        # One copy races the outbox's own event; the other comes after the portrait is READY.
        await js.publish("story.created", story_created(created), headers={"Nats-Msg-Id": f"test-copy-1:{story_id}"})
        ready = (await stories.wait_ready([story_id]))[story_id]
        second = await js.publish(
            "story.created", story_created(created), headers={"Nats-Msg-Id": f"test-copy-2:{story_id}"}
        )
        deadline = asyncio.get_running_loop().time() + PORTRAIT_TIMEOUT_S
        while not await consumer_settled(js, second.seq):
            assert asyncio.get_running_loop().time() < deadline, "the copies were never acknowledged"
            await asyncio.sleep(POLL_S)
        assert (await js.stream_info(STREAM)).state.messages == 3, "JetStream should keep all three events"
    finally:
        await nc.close()

    final = await stories.get(story_id)
    assert final.portrait_status == pb.PORTRAIT_STATUS_READY
    assert final.storage_id == ready.storage_id == f"portraits/{story_id}/1.png"
    assert final.update_time == ready.update_time, "the story changed again after it became READY"
    assert await portrait_keys(s3, s3_bucket) == keys_of([story_id])
    assert len(events_for(processes["story"], "story.portrait_attached", story_id)) == 1
    assert len(events_for(processes["image"], "portrait.step_started", story_id, step="upload")) == 1


# ---------------------------------------------------------------------------- e. start-up errors


def config_failures(process: ServiceProcess) -> list[str]:
    return [line.get("error", "") for line in log_events(process) if line.get("event") == "config.rejected"]


async def start_all_and_wait_for_exits(
    start_service, env: dict[str, str], timeout: float
) -> dict[str, tuple[ServiceProcess, int | None]]:
    processes = {name: start_service(name, env) for name in SERVICES}
    codes = await asyncio.gather(*(wait_for_exit(process, timeout) for process in processes.values()))
    return {name: (process, code) for (name, process), code in zip(processes.items(), codes, strict=True)}


async def test_without_auth_tokens_every_service_refuses_to_start(env, start_service):
    env = {name: value for name, value in env.items() if name != "AUTH_TOKENS"}
    for name, (process, code) in (await start_all_and_wait_for_exits(start_service, env, 15)).items():
        assert code == 2, f"{name} exited with {code}:\n{process.log_tail()}"
        failures = config_failures(process)
        assert len(failures) == 1 and failures[0].startswith("AUTH_TOKENS:"), f"{name}: {failures}"


async def test_a_malformed_database_url_stops_every_service_naming_it(env, start_service):
    env = {**env, "DATABASE_URL": "not-a-url"}
    for name, (process, code) in (await start_all_and_wait_for_exits(start_service, env, 15)).items():
        assert code == 2, f"{name} exited with {code}:\n{process.log_tail()}"
        failures = config_failures(process)
        assert len(failures) == 1 and failures[0].startswith("DATABASE_URL:"), f"{name}: {failures}"


CANNOT_CONNECT = re.compile(r"(cannot|can't|could not|unable to) connect", re.IGNORECASE)


async def test_an_unreachable_database_stops_every_service_saying_so(env, start_service):
    password = "pw-" + uuid.uuid4().hex  # must never reach a log line
    env = {
        **env,
        "DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:{free_port()}/casefile",
        "DATABASE_CONNECT_TIMEOUT_SECONDS": "1",
    }
    for name, (process, code) in (await start_all_and_wait_for_exits(start_service, env, 30)).items():
        text = process.log_path.read_text(errors="replace")
        assert code not in (None, 0), f"{name} {'still runs' if code is None else 'exited 0'}:\n{text[-3000:]}"
        errors = [line.get("error", "") for line in log_events(process)]
        assert any("DATABASE_URL" in error and CANNOT_CONNECT.search(error) for error in errors), (
            f"{name} has no log line saying it cannot connect to DATABASE_URL:\n{text[-3000:]}"
        )
        assert password not in text, f"{name} logged the database password"

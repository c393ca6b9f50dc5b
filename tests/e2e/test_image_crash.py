"""A SIGKILLed image process must not hold its portrait for long.

The real story service and two real image processes share one durable consumer; the
portrait provider is the fake Recraft server, slowed down so that a paint is still under
way when the process painting it is killed. The other process must take the portrait over
within about one ack wait (plus the lease margin and a redelivery delay), and the effect
must still happen once: one object, one attachment to the story.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import aiobotocore.session
import asyncpg
import grpc
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from shared.auth import bearer_metadata
from tests.fakes.recraft import GENERATIONS_PATH, FakeRecraft
from tools.infra import ServiceProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ACK_WAIT_S = 3
# Each answer of the fake (the generation call, then the download) takes this long, so
# that the first process is surely mid-paint when it is killed.
PROVIDER_DELAY_S = 2.0
# From the kill: at most one ack wait since the last heartbeat, the lease margin (2 s), a
# redelivery delay (1 s), a quick paint; the rest is slack for a loaded machine. Without
# heartbeats the ack wait would have to cover the whole attempt budget (90 s before).
RECOVERY_BOUND_S = ACK_WAIT_S + 2 + 1 + 3
CALL_TIMEOUT_S = 10.0
POLL_S = 0.1
CRASH_SETTINGS = {
    "PORTRAIT_ACK_WAIT_SECONDS": str(ACK_WAIT_S),
    "OUTBOX_POLL_INTERVAL_SECONDS": "0.2",
    "PORTRAIT_REDELIVERY_BACKOFF_SECONDS": "0.5,1",
    # A BUSY answer while the dead process's lease runs out costs a delivery; leave plenty.
    "PORTRAIT_MAX_DELIVER": "20",
}


async def test_killed_image_process_hands_its_portrait_over_within_the_ack_wait(
    start_service: Callable[..., ServiceProcess],
    make_env: Callable[..., dict[str, str]],
    auth_tokens: dict[str, str],
    database_url: str,
    s3_endpoint_url: str,
    s3_bucket: str,
):
    async with FakeRecraft(api_key="k-crash") as recraft:
        recraft.delay_seconds = PROVIDER_DELAY_S
        env = make_env(
            PORTRAIT_PROVIDER="recraft",
            RECRAFT_API_KEY="k-crash",
            RECRAFT_BASE_URL=recraft.api_base_url,
            ALLOW_PRIVATE_DOWNLOADS="true",
            **CRASH_SETTINGS,
        )
        story_process, image_processes = await _start_stack(start_service, env)
        async with grpc.aio.insecure_channel(env["STORY_ADDR"]) as channel:
            stories = story_service_pb2_grpc.StoryServiceStub(channel)
            metadata = bearer_metadata(auth_tokens["gateway"])
            reply = await stories.GenerateStory(
                pb.GenerateStoryRequest(user_id="u-crash", request_id=uuid.uuid4().hex),
                metadata=metadata,
                timeout=CALL_TIMEOUT_S,
            )
            story_id = reply.story.story_id

            await _until(lambda: recraft.requests_to(GENERATIONS_PATH), 30, "the first provider call")
            painter = _the_painter(image_processes, story_id)
            survivor = next(process for process in image_processes if process is not painter)
            await asyncio.to_thread(painter.kill)
            killed_at = asyncio.get_running_loop().time()
            recraft.delay_seconds = 0  # measure the handover, not a second slow paint

            story = await _until_ready(stories, metadata, story_id, RECOVERY_BOUND_S + 10)
            recovery_s = asyncio.get_running_loop().time() - killed_at

        key = f"portraits/{story_id}/1.png"
        assert recovery_s < RECOVERY_BOUND_S, f"READY {recovery_s:.1f} s after the kill"
        assert story.storage_id == key
        assert await _portrait_keys(s3_endpoint_url, s3_bucket) == [key]
        # The killed process's call and the survivor's: the portrait was painted again, but
        # stored and attached once.
        assert len(recraft.requests_to(GENERATIONS_PATH)) == 2
        await _assert_effect_once(database_url, story_id, key, painter, survivor, story_process)


async def _start_stack(
    start_service: Callable[..., ServiceProcess], env: dict[str, str]
) -> tuple[ServiceProcess, list[ServiceProcess]]:
    """The story service and two image processes (own listen addresses), all consuming."""
    second_image_env = {**env, "IMAGE_ADDR": f"127.0.0.1:{free_port()}"}
    story = start_service("story", env)
    images = [start_service("image", env), start_service("image", second_image_env)]
    await asyncio.gather(
        story.wait_healthy(env["STORY_ADDR"]),
        images[0].wait_healthy(env["IMAGE_ADDR"]),
        images[1].wait_healthy(second_image_env["IMAGE_ADDR"]),
    )
    # Both must be pulling before the story exists, or the survivor could not take over.
    for image in images:
        await _until(lambda image=image: _events(image, "consumer.subscribed", consumer="image-portraits"), 15, "the consumer ready")
    return story, images


def _the_painter(processes: list[ServiceProcess], story_id: str) -> ServiceProcess:
    painters = [
        process for process in processes if _events(process, "portrait.step_started", story_id, step="generate")
    ]
    assert len(painters) == 1, f"expected one process calling the provider, got {len(painters)}"
    return painters[0]


async def _until_ready(stories, metadata, story_id: str, timeout: float) -> pb.Story:
    async def ready() -> pb.Story | None:
        reply = await stories.GetStory(pb.GetStoryRequest(story_id=story_id), metadata=metadata, timeout=CALL_TIMEOUT_S)
        status = reply.story.portrait_status
        assert status in (pb.PORTRAIT_STATUS_PENDING, pb.PORTRAIT_STATUS_READY), reply.story.portrait_error
        return reply.story if status == pb.PORTRAIT_STATUS_READY else None

    return await _until(ready, timeout, "the portrait READY")


async def _assert_effect_once(
    database_url: str,
    story_id: str,
    key: str,
    painter: ServiceProcess,
    survivor: ServiceProcess,
    story_process: ServiceProcess,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT attempt, status, storage_id, deliveries FROM image.portraits WHERE story_id = $1",
            uuid.UUID(story_id),
        )
    finally:
        await conn.close()
    assert [(row["attempt"], row["status"], row["storage_id"]) for row in rows] == [(1, "READY", key)]
    assert rows[0]["deliveries"] >= 2  # the killed process's delivery, then the survivor's
    # The killed process never got to store anything; the survivor stored and attached once.
    assert _events(painter, "portrait.step_started", story_id, step="upload") == []
    assert len(_events(survivor, "portrait.step_started", story_id, step="upload")) == 1
    assert len(_events(survivor, "portrait.attempt_succeeded", story_id)) == 1
    # The story changed to READY once: SetStoryImage logs only a change.
    assert len(_events(story_process, "story.portrait_attached", story_id)) == 1


async def _portrait_keys(endpoint_url: str, bucket: str) -> list[str]:
    session = aiobotocore.session.get_session()
    async with session.create_client("s3", endpoint_url=endpoint_url, region_name="us-east-1") as s3:
        answer = await s3.list_objects_v2(Bucket=bucket, Prefix="portraits/")
    return [item["Key"] for item in answer.get("Contents", [])]


def _events(process: ServiceProcess, event: str, story_id: str | None = None, **fields: str) -> list[dict]:
    """The JSON log lines of `process` with this event (and story id and fields)."""
    found = []
    for line in _log_lines(process):
        if line.get("event") != event or (story_id is not None and line.get("story_id") != story_id):
            continue
        if all(line.get(name) == value for name, value in fields.items()):
            found.append(line)
    return found


def _log_lines(process: ServiceProcess) -> list[dict]:
    if not process.log_path.exists():
        return []
    lines = []
    for text in process.log_path.read_text(errors="replace").splitlines():
        if text.startswith("{"):
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue  # a line cut short by the SIGKILL
    return lines


async def _until(check: Callable, timeout: float, what: str):
    """Polls `check` (sync or async) until it returns something truthy; returns that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)

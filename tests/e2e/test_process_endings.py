"""How processes end: SIGTERM exits 0 within the grace; a kill -9 on a portrait's last
delivery still ends that portrait (FAILED), and its WatchStory stream with it."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable

import grpc
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from shared.auth import bearer_metadata
from tests.fakes.recraft import GENERATIONS_PATH, FakeRecraft
from tools.infra import FAST_RECONNECT, ServiceProcess, free_port
from tests.case_files import case_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# tools/stack.py gives each service this long after SIGTERM before it kills it.
STOP_GRACE_S = 10.0
CALL_TIMEOUT_S = 10.0


async def exit_code_after_sigterm(process: ServiceProcess, grace: float = STOP_GRACE_S) -> int | None:
    """SIGTERM to the service alone (not its group); its exit code, or None if still running."""
    os.kill(process.pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while process.is_running() and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return process.returncode


def story_content(prompt: str) -> pb.StoryContent:
    return case_file(image_generation_prompt=prompt)


async def test_every_service_exits_0_within_its_grace_on_sigterm(
    start_service: Callable[..., ServiceProcess], make_env, auth_tokens
):
    """Mid-work: a watch stream open on the story service, the image service consuming."""
    env = make_env(OUTBOX_POLL_INTERVAL_SECONDS="0.2")
    processes = {name: start_service(name, env) for name in ("credits", "story")}
    await asyncio.gather(*(p.wait_healthy(env[f"{n.upper()}_ADDR"]) for n, p in processes.items()))
    async with grpc.aio.insecure_channel(env["STORY_ADDR"], options=FAST_RECONNECT) as channel:
        stories = story_service_pb2_grpc.StoryServiceStub(channel)
        gateway = bearer_metadata(auth_tokens["gateway"])
        created = (
            await stories.CreateStory(
                pb.CreateStoryRequest(user_id="u-term", content=story_content("a pale woman")),
                metadata=gateway,
                timeout=CALL_TIMEOUT_S,
            )
        ).story
        # No image service yet: the portrait stays PENDING and the watch stays open.
        watch = stories.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=gateway)
        assert (await watch.read()).story.portrait_status == pb.PORTRAIT_STATUS_PENDING
        image = start_service("image", env)
        await image.wait_healthy(env["IMAGE_ADDR"])

        codes = {"image": await exit_code_after_sigterm(image)}
        codes["story"] = await exit_code_after_sigterm(processes["story"])
        # The open watch ended cleanly, with the current state, when story stopped.
        async with asyncio.timeout(5):
            while (response := await watch.read()) is not grpc.aio.EOF:
                assert response.story.story_id == created.story_id
        assert await watch.code() == grpc.StatusCode.OK
    codes["credits"] = await exit_code_after_sigterm(processes["credits"])

    assert codes == {"image": 0, "story": 0, "credits": 0}, {
        name: process.log_tail() for name, process in {**processes, "image": image}.items()
    }


async def test_a_kill_on_the_last_delivery_still_ends_the_portrait_and_its_watch(
    start_service: Callable[..., ServiceProcess], make_env, auth_tokens
):
    ack_wait = 2
    async with FakeRecraft(api_key="k-kill") as recraft:
        recraft.delay_seconds = 30  # the first process is surely mid-paint when killed
        env = make_env(
            PORTRAIT_PROVIDER="recraft",
            RECRAFT_API_KEY="k-kill",
            RECRAFT_BASE_URL=recraft.api_base_url,
            ALLOW_PRIVATE_DOWNLOADS="true",
            PORTRAIT_ACK_WAIT_SECONDS=str(ack_wait),
            PORTRAIT_MAX_DELIVER="1",  # its first delivery is its last
            OUTBOX_POLL_INTERVAL_SECONDS="0.2",
        )
        story = start_service("story", env)
        painter = start_service("image", env)
        await asyncio.gather(story.wait_healthy(env["STORY_ADDR"]), painter.wait_healthy(env["IMAGE_ADDR"]))
        async with grpc.aio.insecure_channel(env["STORY_ADDR"], options=FAST_RECONNECT) as channel:
            stories = story_service_pb2_grpc.StoryServiceStub(channel)
            gateway = bearer_metadata(auth_tokens["gateway"])
            created = (
                await stories.CreateStory(
                    pb.CreateStoryRequest(user_id="u-kill", content=story_content("the night porter"),
                                          request_id=uuid.uuid4().hex),
                    metadata=gateway,
                    timeout=CALL_TIMEOUT_S,
                )
            ).story
            watching = asyncio.create_task(_watch_until_end(stories, created.story_id, gateway))
            async with asyncio.timeout(30):
                while not recraft.requests_to(GENERATIONS_PATH):
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(painter.kill)

            # Another image process: no delivery is left for the message, yet the portrait ends.
            survivor = start_service("image", {**env, "IMAGE_ADDR": f"127.0.0.1:{free_port()}"})
            async with asyncio.timeout(60):
                seen = await watching

        assert seen[0].portrait_status == pb.PORTRAIT_STATUS_PENDING
        final = seen[-1]
        assert final.portrait_status == pb.PORTRAIT_STATUS_FAILED, survivor.log_tail()
        assert "no delivery left" in final.portrait_error
        assert len(recraft.requests_to(GENERATIONS_PATH)) == 1  # never painted a second time


async def _watch_until_end(stories, story_id: str, metadata) -> list[pb.Story]:
    seen = []
    async for response in stories.WatchStory(pb.WatchStoryRequest(story_id=story_id), metadata=metadata):
        seen.append(response.story)
    return seen

"""The real story and image services together: a story's portrait arrives and can be opened.

Both run from their build() in this process, on one database, one nats-server and one
moto bucket, talking over loopback gRPC and JetStream exactly as in production.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import httpx
import pytest

from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.image.config import Config as ImageConfig
from services.image.main import build as build_image
from services.story.config import Config as StoryConfig
from services.story.main import build as build_story
from shared.auth import bearer_metadata
from tools.infra import free_port
from tests.case_files import case_file

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
GATEWAY = bearer_metadata("t-gateway")
FINAL_STATUSES = {pb.PORTRAIT_STATUS_READY, pb.PORTRAIT_STATUS_FAILED, pb.PORTRAIT_STATUS_SKIPPED}


@pytest.fixture
async def stack_of_two(database_url, nats_server, s3_endpoint_url, s3_bucket):
    """(story stub, image stub) for the two services wired to each other."""
    story_addr = f"127.0.0.1:{free_port()}"
    async with contextlib.AsyncExitStack() as stack:
        await build_story(
            StoryConfig.from_env(
                {
                    "STORY_ADDR": story_addr,
                    "DATABASE_URL": database_url,
                    "NATS_URL": nats_server.url,
                    "AUTH_TOKENS": TOKENS,
                    "OUTBOX_POLL_INTERVAL_SECONDS": "0.1",
                }
            ),
            stack,
        )
        image_server = await build_image(
            ImageConfig.from_env(
                {
                    "IMAGE_ADDR": "127.0.0.1:0",
                    "DATABASE_URL": database_url,
                    "NATS_URL": nats_server.url,
                    "S3_ENDPOINT_URL": s3_endpoint_url,
                    "S3_BUCKET": s3_bucket,
                    "STORY_ADDR": story_addr,
                    "AUTH_TOKENS": TOKENS,
                    "PORTRAIT_REDELIVERY_BACKOFF_SECONDS": "0.2",
                }
            ),
            stack,
        )
        story_channel = grpc.aio.insecure_channel(story_addr)
        image_channel = grpc.aio.insecure_channel(f"127.0.0.1:{image_server.port}")
        stack.push_async_callback(story_channel.close)
        stack.push_async_callback(image_channel.close)
        yield (
            story_service_pb2_grpc.StoryServiceStub(story_channel),
            image_service_pb2_grpc.ImageServiceStub(image_channel),
        )


def content(prompt: str) -> pb.StoryContent:
    return case_file(image_generation_prompt=prompt)


async def final_story(story, story_id: str, timeout: float = 15.0) -> pb.Story:
    async with asyncio.timeout(timeout):
        while True:
            current = (await story.GetStory(pb.GetStoryRequest(story_id=story_id), metadata=GATEWAY)).story
            if current.portrait_status in FINAL_STATUSES:
                return current
            await asyncio.sleep(0.1)


async def test_created_story_gets_a_portrait_that_opens(stack_of_two):
    story, image = stack_of_two
    created = (
        await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content("a pale woman")), metadata=GATEWAY)
    ).story

    done = await final_story(story, created.story_id)

    assert done.portrait_status == pb.PORTRAIT_STATUS_READY
    assert done.storage_id == f"portraits/{created.story_id}/1.png"
    answer = await image.GetImageUrl(image_service_pb2.GetImageUrlRequest(storage_id=done.storage_id), metadata=GATEWAY)
    async with httpx.AsyncClient() as http:
        response = await http.get(answer.url)
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")


async def test_blank_prompt_story_ends_skipped(stack_of_two):
    story, _ = stack_of_two
    created = (
        await story.CreateStory(pb.CreateStoryRequest(user_id="u1", content=content("   ")), metadata=GATEWAY)
    ).story

    done = await final_story(story, created.story_id)

    assert done.portrait_status == pb.PORTRAIT_STATUS_SKIPPED
    assert done.portrait_error == "image_generation_prompt is blank"
    assert done.storage_id == ""

"""CONTRACT.md's "who may call" column, cell by cell, on the real servers.

Every method of the three services is called with every caller's token: a caller the
contract lists gets past authentication (whatever the method then answers), any other
gets PERMISSION_DENIED, and no token or an unknown one UNAUTHENTICATED. The table below is
typed from CONTRACT.md, not read from the code under test. One departure, from the credits
issue: admin may also call Charge, ReserveStorage, ReleaseStorage and RecordGeneration
(support and operations move money by hand; the proto says so).
"""

from __future__ import annotations

import contextlib

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as credits_pb
from casefile.image.v1 import image_service_pb2 as image_pb
from casefile.story.v1 import story_service_pb2 as story_pb
from services.credits.config import Config as CreditsConfig
from services.credits.main import build as build_credits
from services.image.config import Config as ImageConfig
from services.image.main import build as build_image
from services.story.config import Config as StoryConfig
from services.story.main import build as build_story
from shared.auth import bearer_metadata
from tools.infra import free_port

pytestmark = pytest.mark.timeout(60)

CALLERS = ("gateway", "admin", "story", "image")
TOKENS = {caller: f"t-{caller}" for caller in CALLERS}
PLAYER_FACING = {"gateway", "admin"}

# (service, method, request, is the response a stream) -> callers CONTRACT.md admits.
CONTRACT = [
    ("casefile.story.v1.StoryService", "GenerateStory", story_pb.GenerateStoryRequest(user_id="u1"), False, PLAYER_FACING),
    ("casefile.story.v1.StoryService", "CreateStory", story_pb.CreateStoryRequest(user_id="u1"), False, PLAYER_FACING),
    ("casefile.story.v1.StoryService", "GetStory", story_pb.GetStoryRequest(story_id="x"), False, {"gateway", "admin", "image"}),
    ("casefile.story.v1.StoryService", "ListStories", story_pb.ListStoriesRequest(user_id="u1"), False, PLAYER_FACING),
    ("casefile.story.v1.StoryService", "WatchStory", story_pb.WatchStoryRequest(story_id="x"), True, PLAYER_FACING),
    ("casefile.story.v1.StoryService", "SetStoryImage", story_pb.SetStoryImageRequest(story_id="x"), False, {"image"}),
    ("casefile.story.v1.StoryService", "SetPortraitStatus", story_pb.SetPortraitStatusRequest(story_id="x"), False, {"image"}),
    ("casefile.story.v1.StoryService", "RetryPortrait", story_pb.RetryPortraitRequest(story_id="x"), False, {"admin"}),
    ("casefile.image.v1.ImageService", "CreateGenerationJob", image_pb.CreateGenerationJobRequest(), False, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "GetGenerationJob", image_pb.GetGenerationJobRequest(), False, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "ListGenerationJobs", image_pb.ListGenerationJobsRequest(), False, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "WatchGenerationJob", image_pb.WatchGenerationJobRequest(), True, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "CancelGenerationJob", image_pb.CancelGenerationJobRequest(), False, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "ListModels", image_pb.ListModelsRequest(), False, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "GetImageUrl", image_pb.GetImageUrlRequest(), False, {"gateway", "admin", "story"}),
    ("casefile.image.v1.ImageService", "DeleteImage", image_pb.DeleteImageRequest(), False, PLAYER_FACING),
    ("casefile.image.v1.ImageService", "GetJobStats", image_pb.GetJobStatsRequest(), False, PLAYER_FACING),
    ("casefile.credits.v1.CreditsService", "GetAccount", credits_pb.GetAccountRequest(user_id="u1"), False, {"gateway", "admin", "image"}),
    ("casefile.credits.v1.CreditsService", "Grant", credits_pb.GrantRequest(), False, {"admin"}),
    ("casefile.credits.v1.CreditsService", "SetPlan", credits_pb.SetPlanRequest(), False, {"admin"}),
    ("casefile.credits.v1.CreditsService", "Charge", credits_pb.ChargeRequest(), False, {"image", "admin"}),
    ("casefile.credits.v1.CreditsService", "Refund", credits_pb.RefundRequest(), False, {"image", "admin"}),
    ("casefile.credits.v1.CreditsService", "ReserveStorage", credits_pb.ReserveStorageRequest(), False, {"image", "admin"}),
    ("casefile.credits.v1.CreditsService", "ReleaseStorage", credits_pb.ReleaseStorageRequest(), False, {"image", "admin"}),
    ("casefile.credits.v1.CreditsService", "RecordGeneration", credits_pb.RecordGenerationRequest(), False, {"image", "admin"}),
    ("casefile.credits.v1.CreditsService", "GetUsage", credits_pb.GetUsageRequest(), False, PLAYER_FACING),
    ("casefile.credits.v1.CreditsService", "ListLedgerEntries", credits_pb.ListLedgerEntriesRequest(), False, PLAYER_FACING),
]
AUTH_CODES = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture
async def channels(database_url, nats_server, s3_endpoint_url, s3_bucket):
    """service name -> a channel to it, all three built as main() builds them."""
    tokens = ",".join(f"{caller}:{token}" for caller, token in TOKENS.items())
    story_addr = f"127.0.0.1:{free_port()}"
    common = {"DATABASE_URL": database_url, "NATS_URL": nats_server.url, "AUTH_TOKENS": tokens}
    async with contextlib.AsyncExitStack() as stack:
        await build_story(StoryConfig.from_env({**common, "STORY_ADDR": story_addr}), stack)
        image = await build_image(
            ImageConfig.from_env(
                {**common, "IMAGE_ADDR": "127.0.0.1:0", "STORY_ADDR": story_addr,
                 "S3_ENDPOINT_URL": s3_endpoint_url, "S3_BUCKET": s3_bucket}
            ),
            stack,
        )
        credits = await build_credits(CreditsConfig.from_env({**common, "CREDITS_ADDR": "127.0.0.1:0"}), stack)
        addresses = {
            "casefile.story.v1.StoryService": story_addr,
            "casefile.image.v1.ImageService": f"127.0.0.1:{image.port}",
            "casefile.credits.v1.CreditsService": f"127.0.0.1:{credits.port}",
        }
        opened = {}
        for service, address in addresses.items():
            channel = grpc.aio.insecure_channel(address)
            stack.push_async_callback(channel.close)
            opened[service] = channel
        yield opened


async def call(channel, service: str, method: str, request, streaming: bool, metadata) -> grpc.StatusCode:
    path = f"/{service}/{method}"
    serialize, deserialize = type(request).SerializeToString, lambda data: data
    try:
        if streaming:
            stream = channel.unary_stream(path, request_serializer=serialize, response_deserializer=deserialize)(
                request, metadata=metadata, timeout=10
            )
            async for _ in stream:
                break
            stream.cancel()
        else:
            await channel.unary_unary(path, request_serializer=serialize, response_deserializer=deserialize)(
                request, metadata=metadata, timeout=10
            )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("caller", CALLERS)
async def test_each_method_admits_exactly_the_callers_of_the_contract(channels, caller):
    wrong = []
    for service, method, request, streaming, admitted in CONTRACT:
        code = await call(channels[service], service, method, request, streaming, bearer_metadata(TOKENS[caller]))
        expected_denied = caller not in admitted
        if expected_denied and code != grpc.StatusCode.PERMISSION_DENIED:
            wrong.append(f"{method} answered {caller} with {code.name}, not PERMISSION_DENIED")
        if not expected_denied and code in AUTH_CODES:
            wrong.append(f"{method} refused {caller} ({code.name}) although the contract admits it")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("metadata", [(), bearer_metadata("not-a-token")], ids=["no-token", "unknown-token"])
async def test_every_method_refuses_an_unauthenticated_call(channels, metadata):
    for service, method, request, streaming, _ in CONTRACT:
        code = await call(channels[service], service, method, request, streaming, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{method}: {code.name}"

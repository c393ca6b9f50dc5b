"""The RPC metrics of a real server (the story service), scraped from its /metrics."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from prometheus_client import REGISTRY

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story.config import Config
from services.story.main import build
from tests.case_files import case_file
from tests.integration.test_story_service import ADMIN, GATEWAY, IMAGE, story_config
from tests.scrape import scrape

STORY = "casefile.story.v1.StoryService"
MISSING = "00000000-0000-4000-8000-000000000000"


@contextlib.asynccontextmanager
async def story_server(database_url, nats_url, **settings: str):
    config = story_config(database_url, nats_url)
    if settings:
        config = Config.from_env(
            {"STORY_ADDR": "127.0.0.1:0", "DATABASE_URL": database_url, "NATS_URL": nats_url,
             "AUTH_TOKENS": "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image",
             "OUTBOX_POLL_INTERVAL_SECONDS": "0.1", **settings}
        )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        server = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield server, channel, story_service_pb2_grpc.StoryServiceStub(channel)


@pytest.fixture
async def metered(database_url, nats_server):
    async with story_server(database_url, nats_server.url, METRICS_ADDR="127.0.0.1:0") as served:
        yield served


def handled(scraped, method: str, code: str) -> float:
    return scraped.value("grpc_server_handled_total", grpc_service=STORY, grpc_method=method, grpc_code=code)


async def test_rpcs_are_counted_by_method_and_code_and_timed(metered):
    server, _, stub = metered
    before = await scrape(server.metrics.url)
    created = (await stub.CreateStory(pb.CreateStoryRequest(user_id="u1", content=case_file()), metadata=GATEWAY)).story
    await stub.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetStory(pb.GetStoryRequest(story_id=MISSING), metadata=GATEWAY)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetStory(pb.GetStoryRequest(story_id="nope"), metadata=GATEWAY)
    with pytest.raises(grpc.aio.AioRpcError):  # refused by the auth interceptor, counted all the same
        await stub.GetStory(pb.GetStoryRequest(story_id=created.story_id))
    # Served again after a refusal: counted with the served handler's code again.
    await stub.GetStory(pb.GetStoryRequest(story_id=created.story_id), metadata=GATEWAY)
    after = await scrape(server.metrics.url)

    assert handled(after, "GetStory", "OK") - handled(before, "GetStory", "OK") == 2
    assert handled(after, "GetStory", "NOT_FOUND") - handled(before, "GetStory", "NOT_FOUND") == 1
    assert handled(after, "GetStory", "INVALID_ARGUMENT") - handled(before, "GetStory", "INVALID_ARGUMENT") == 1
    assert handled(after, "GetStory", "UNAUTHENTICATED") - handled(before, "GetStory", "UNAUTHENTICATED") == 1
    assert handled(after, "CreateStory", "OK") - handled(before, "CreateStory", "OK") == 1
    labels = {"grpc_type": "unary", "grpc_service": STORY, "grpc_method": "GetStory"}
    started = after.value("grpc_server_started_total", **labels) - before.value("grpc_server_started_total", **labels)
    timed = after.value("grpc_server_handling_seconds_count", **labels) - before.value(
        "grpc_server_handling_seconds_count", **labels
    )
    assert started == timed == 5
    assert after.value("grpc_server_handling_seconds_sum", **labels) > before.value("grpc_server_handling_seconds_sum", **labels)


async def test_a_stream_is_counted_when_it_ends(metered):
    server, _, stub = metered
    created = (await stub.CreateStory(pb.CreateStoryRequest(user_id="u1", content=case_file()), metadata=GATEWAY)).story
    before = await scrape(server.metrics.url)
    stream = stub.WatchStory(pb.WatchStoryRequest(story_id=created.story_id), metadata=GATEWAY)
    await stream.read()
    await stub.SetStoryImage(
        pb.SetStoryImageRequest(story_id=created.story_id, storage_id="portraits/x/1.png", attempt=1), metadata=IMAGE
    )
    while await stream.read() is not grpc.aio.EOF:
        pass
    labels = {"grpc_type": "server_stream", "grpc_service": STORY, "grpc_method": "WatchStory", "grpc_code": "OK"}
    for _ in range(100):  # the server records the end just after the client sees it
        after = await scrape(server.metrics.url)
        if after.value("grpc_server_handled_total", **labels) > before.value("grpc_server_handled_total", **labels):
            break
        await asyncio.sleep(0.02)
    assert after.value("grpc_server_handled_total", **labels) - before.value("grpc_server_handled_total", **labels) == 1


async def test_method_names_a_caller_makes_up_never_become_label_values(metered):
    server, channel, _ = metered
    before = await scrape(server.metrics.url)
    for name in ("Invented1", "Invented2", "x" * 300):
        call = channel.unary_unary(f"/{STORY}/{name}", request_serializer=lambda m: m, response_deserializer=lambda m: m)
        with pytest.raises(grpc.aio.AioRpcError):
            await call(b"", metadata=ADMIN)
    after = await scrape(server.metrics.url)

    assert "Invented" not in after.text and "xxxxxxxx" not in after.text
    unknown = {"grpc_service": "unknown", "grpc_method": "unknown"}
    assert after.value("grpc_server_started_total", **unknown) - before.value("grpc_server_started_total", **unknown) == 3


async def test_without_metrics_addr_there_is_no_endpoint_and_rpcs_cost_nothing(database_url, nats_server):
    async with story_server(database_url, nats_server.url) as (server, _, stub):
        labels = {"grpc_service": STORY, "grpc_method": "GetStory", "grpc_code": "NOT_FOUND", "grpc_type": "unary"}
        before = REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetStory(pb.GetStoryRequest(story_id=MISSING), metadata=GATEWAY)
        assert server.metrics is None
        assert (REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0) == before

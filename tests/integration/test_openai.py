"""OpenAIWriter against a fake chat completions API over real HTTP: the documented request,
structured output and the fall-backs for endpoints without it, and the story service writing
with it. The behaviour both model writers share is in test_chat_writers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import asyncpg
import grpc
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story.config import Config
from services.story.main import build
from services.story.writers import OpenAIWriter, WriterError, build_writer
from services.story.writers.chat import RetryPolicy
from services.story.writers.openai import ResponseFormat
from services.story.writers.story_json import INSTRUCTIONS, STORY_SCHEMA
from shared.auth import bearer_metadata
from shared.config import ConfigError
from tests.fakes.openai import COMPLETIONS_PATH, SAMPLE_STORY, FakeOpenAI
from tools.infra import REPO_ROOT

pytestmark = pytest.mark.timeout(30)

KEY = "sk-openai-test-secret-31"


@pytest.fixture
async def openai():
    async with FakeOpenAI(api_key=KEY) as fake:
        yield fake


def writer_for(fake: FakeOpenAI, **options) -> OpenAIWriter:
    return OpenAIWriter(KEY, fake.api_base_url, retry_policy=RetryPolicy(first_delay=0.01), **options)


async def test_writes_a_story_with_structured_output(openai):
    story = await writer_for(openai, model="gpt-test").write(theme="drowned choir", seed="s")

    assert story == SAMPLE_STORY
    [call] = openai.requests
    assert (call.method, call.path) == ("POST", COMPLETIONS_PATH)
    assert call.headers["authorization"] == f"Bearer {KEY}"
    body = call.json()
    assert body["model"] == "gpt-test"
    system, user = body["messages"]
    assert system == {"role": "system", "content": INSTRUCTIONS}
    assert user["role"] == "user" and "drowned choir" in user["content"]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "case_file", "strict": True, "schema": STORY_SCHEMA},
    }
    assert body["max_tokens"] >= 4096


def test_the_schema_is_one_strict_mode_accepts():
    """Strict structured output needs every property required and no additional ones."""

    def check(node):
        if node.get("type") == "object":
            assert node["additionalProperties"] is False
            assert sorted(node["required"]) == sorted(node["properties"])
            for child in node["properties"].values():
                check(child)
        if node.get("type") == "array":
            check(node["items"])

    check(STORY_SCHEMA)


async def test_an_endpoint_without_json_schema_gets_json_object_from_then_on(openai, caplog):
    openai.response_formats = {"json_object"}
    writer = writer_for(openai)

    assert await writer.write(theme=None, seed="s") == SAMPLE_STORY
    assert await writer.write(theme=None, seed="t") == SAMPLE_STORY

    kinds = [request.json().get("response_format", {}).get("type") for request in openai.requests]
    assert kinds == ["json_schema", "json_object", "json_object"]
    assert writer.response_format is ResponseFormat.JSON_OBJECT
    [adapted] = [record for record in caplog.records if record.getMessage() == "story.writer_request_adapted"]
    assert (adapted.setting, adapted.to) == ("response_format", "json_object")


async def test_an_endpoint_without_any_response_format_gets_plain_instructions(openai):
    openai.response_formats = set()
    openai.reply_next("Sure! Here it is:\n```json\n" + json.dumps(SAMPLE_STORY) + "\n```")

    assert await writer_for(openai).write(theme=None, seed="s") == SAMPLE_STORY

    final = openai.requests[-1].json()
    assert "response_format" not in final
    assert "JSON" in final["messages"][0]["content"]
    assert len(openai.requests) == 3


async def test_an_endpoint_that_wants_max_completion_tokens_gets_it(openai):
    openai.takes_max_tokens = False
    writer = writer_for(openai)
    assert await writer.write(theme=None, seed="s") == SAMPLE_STORY
    await writer.write(theme=None, seed="t")
    last = openai.requests[-1].json()
    assert "max_tokens" not in last and last["max_completion_tokens"] >= 4096
    assert len(openai.requests) == 3


async def test_a_400_about_something_else_is_not_taken_for_a_missing_feature(openai):
    openai.fail_next(status=400, message="'messages' must not be empty")
    with pytest.raises(WriterError, match="must not be empty"):
        await writer_for(openai).write(theme=None, seed="s")
    assert len(openai.requests) == 1


async def test_the_content_filter_is_not_parsed_and_not_retried(openai):
    openai.content_filter_next = True
    with pytest.raises(WriterError, match="content_filter") as raised:
        await writer_for(openai).write(theme=None, seed="s")
    assert raised.value.transient is False
    assert len(openai.requests) == 1


async def test_a_reasoning_model_s_think_block_is_skipped(openai):
    openai.reply_next('<think>The user wants {"title": ...} so</think>' + json.dumps(SAMPLE_STORY))
    assert await writer_for(openai).write(theme=None, seed="s") == SAMPLE_STORY
    assert len(openai.requests) == 1


def test_build_writer_defaults_and_the_missing_key():
    writer = build_writer("openai", api_key="k", base_url=None)
    assert (writer.base_url, writer.model) == ("https://api.openai.com/v1", "gpt-4o-mini")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        build_writer("openai", api_key="", base_url=None)


def test_config_without_the_key_names_the_variable():
    env = {"AUTH_TOKENS": "gateway:t", "STORY_WRITER": "openai"}
    with pytest.raises(ConfigError) as raised:
        Config.from_env(env)
    assert raised.value.name == "OPENAI_API_KEY"
    config = Config.from_env({**env, "OPENAI_API_KEY": KEY, "OPENAI_STORY_MODEL": "m", "OPENAI_BASE_URL": "http://x/v1"})
    assert (config.openai_story_model, config.openai_base_url) == ("m", "http://x/v1")
    assert KEY not in repr(config)


def test_the_service_refuses_to_start_without_the_key(tmp_path):
    env = {"PATH": os.environ["PATH"], "AUTH_TOKENS": "gateway:t", "STORY_WRITER": "openai",
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'gen'}"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "services.story.main"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2
    [line] = [json.loads(line) for line in done.stderr.splitlines() + done.stdout.splitlines() if "config" in line]
    assert line["event"] == "config.rejected" and "OPENAI_API_KEY" in line["error"]


# --- the story service writing with it -------------------------------------------------------

GATEWAY = bearer_metadata("t-gateway")


@pytest.fixture
async def openai_story(database_url, nats_server, openai):
    env = {
        "STORY_ADDR": "127.0.0.1:0",
        "DATABASE_URL": database_url,
        "NATS_URL": nats_server.url,
        "AUTH_TOKENS": "gateway:t-gateway,image:t-image",
        "STORY_WRITER": "openai",
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": openai.api_base_url,
        "OPENAI_STORY_MODEL": "gpt-story-test",
    }
    async with contextlib.AsyncExitStack() as stack:
        server = await build(Config.from_env(env), stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        yield story_service_pb2_grpc.StoryServiceStub(channel)


async def test_generate_story_with_the_openai_writer(openai_story, openai):
    request = pb.GenerateStoryRequest(user_id="u1", theme="fog", request_id="r1")
    story = (await openai_story.GenerateStory(request, metadata=GATEWAY)).story

    assert (story.title, story.patient.name) == (SAMPLE_STORY["title"], SAMPLE_STORY["patient"]["name"])
    assert [chapter.text for chapter in story.chapters] == [c["text"] for c in SAMPLE_STORY["chapters"]]
    [call] = openai.requests
    assert call.json()["model"] == "gpt-story-test"
    assert "fog" in call.json()["messages"][1]["content"]


async def test_a_writer_that_never_gets_it_right_is_unavailable_with_the_reason(openai_story, openai, database_url):
    openai.reply_next(json.dumps({"title": "Only a title"}), count=3)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await openai_story.GenerateStory(pb.GenerateStoryRequest(user_id="u1"), metadata=GATEWAY)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no usable story after 3 replies" in raised.value.details()
    assert "lacks patient" in raised.value.details()
    assert len(openai.requests) == 3
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM story.stories") == 0
        assert await conn.fetchval("SELECT count(*) FROM story.outbox") == 0
    finally:
        await conn.close()

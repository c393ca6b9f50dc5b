"""AnthropicWriter's own side of the Messages API, against a fake server over real HTTP.

The behaviour both model writers share (repairs, retries, refusals) is in test_chat_writers.
"""

from __future__ import annotations

import json

import pytest

from services.story.writers import AnthropicWriter, WriterError, build_writer
from services.story.writers.chat import RetryPolicy
from services.story.writers.story_json import INSTRUCTIONS
from tests.fakes.anthropic import MESSAGES_PATH, SAMPLE_STORY, FakeAnthropic

pytestmark = pytest.mark.timeout(30)

KEY = "sk-ant-test-secret-777"


@pytest.fixture
async def anthropic():
    async with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def writer_for(fake: FakeAnthropic, **options) -> AnthropicWriter:
    return AnthropicWriter(KEY, fake.base_url, retry_policy=RetryPolicy(first_delay=0.01), **options)


async def test_writes_a_story_with_the_documented_request(anthropic):
    story = await writer_for(anthropic).write(theme="drowned choir", seed="case-17")

    assert story == SAMPLE_STORY
    [call] = anthropic.requests
    assert (call.method, call.path) == ("POST", MESSAGES_PATH)
    assert call.headers["x-api-key"] == KEY
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert call.headers["content-type"] == "application/json"
    body = call.json()
    assert set(body) == {"model", "max_tokens", "system", "messages"}
    assert body["model"] == "claude-sonnet-4-5"
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] >= 4096
    assert body["system"] == INSTRUCTIONS and "JSON" in body["system"]
    [message] = body["messages"]
    assert message["role"] == "user"
    assert "drowned choir" in message["content"]


async def test_build_writer_points_at_the_configured_base_url_and_model(anthropic):
    writer = build_writer("anthropic", api_key=KEY, base_url=anthropic.base_url, model="claude-haiku-4-5")
    assert await writer.write(theme=None, seed="s") == SAMPLE_STORY
    assert anthropic.requests[0].json()["model"] == "claude-haiku-4-5"
    assert writer.model == "claude-haiku-4-5"


async def test_a_fenced_json_reply_with_typographic_punctuation_is_made_typeable(anthropic):
    story = {**SAMPLE_STORY, "title": "The \u201cQuiet\u201d Ward \u2014 Zo\u00eb"}
    anthropic.reply_text = "Here is the file.\n```json\n" + json.dumps(story, indent=2) + "\n```"
    written = await writer_for(anthropic).write(theme=None, seed="s")
    assert written["title"] == 'The "Quiet" Ward - Zoe'


@pytest.mark.parametrize("stop_reason", ["max_tokens", "model_context_window_exceeded"])
async def test_both_kinds_of_cut_off_ask_for_a_shorter_story(anthropic, stop_reason):
    anthropic.stop_reason = stop_reason
    with pytest.raises(WriterError, match="cut off"):
        await writer_for(anthropic).write(theme=None, seed="s")
    assert len(anthropic.requests) == 3


@pytest.mark.parametrize("stop_reason", ["tool_use", "pause_turn", None])
async def test_a_turn_that_is_not_a_finished_answer_is_not_parsed(anthropic, stop_reason):
    anthropic.stop_reason = stop_reason
    with pytest.raises(WriterError, match="unexpected stop_reason") as raised:
        await writer_for(anthropic).write(theme=None, seed="s")
    assert raised.value.transient is False
    assert len(anthropic.requests) == 1


async def test_an_empty_reply_is_named_in_the_follow_up_turn(anthropic):
    # The Messages API refuses an empty assistant turn, so the writer must not send one.
    anthropic.reply_next("")
    assert await writer_for(anthropic).write(theme=None, seed="s") == SAMPLE_STORY
    said = anthropic.requests[1].json()["messages"][1]
    assert said == {"role": "assistant", "content": "(an empty reply)"}


def test_repr_hides_the_key():
    writer = AnthropicWriter("sk-ant-very-secret")
    assert "sk-ant-very-secret" not in repr(writer)

"""AnthropicWriter against a fake Messages API over real HTTP on loopback."""

from __future__ import annotations

import json
import logging
import time

import pytest

from services.story.writers import AnthropicWriter, WriterError, build_writer
from tests.fakes.anthropic import MESSAGES_PATH, SAMPLE_STORY, FakeAnthropic

pytestmark = pytest.mark.timeout(30)

KEY = "sk-ant-test-secret-777"


@pytest.fixture
async def anthropic():
    async with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def writer_for(fake: FakeAnthropic, api_key: str = KEY, **options) -> AnthropicWriter:
    return AnthropicWriter(api_key, fake.base_url, **options)


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
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] >= 2048
    assert "JSON" in body["system"]
    [message] = body["messages"]
    assert message["role"] == "user"
    assert "drowned choir" in message["content"] and "case-17" in message["content"]


async def test_build_writer_points_at_the_configured_base_url(anthropic):
    writer = build_writer("anthropic", api_key=KEY, base_url=anthropic.base_url)
    assert await writer.write(theme=None, seed="s") == SAMPLE_STORY
    assert "Choose the theme yourself" in anthropic.requests[0].json()["messages"][0]["content"]


async def test_model_is_configurable(anthropic):
    await writer_for(anthropic, model="claude-haiku-4-5").write(theme=None, seed="s")
    assert anthropic.requests[0].json()["model"] == "claude-haiku-4-5"


async def test_a_fenced_json_reply_is_parsed(anthropic):
    anthropic.reply_text = "Here is the file.\n```json\n" + json.dumps(SAMPLE_STORY, indent=2) + "\n```"
    assert await writer_for(anthropic).write(theme=None, seed="s") == SAMPLE_STORY


async def test_prose_instead_of_json_is_permanent(anthropic):
    anthropic.reply_text = "I'd rather not write that story."
    with pytest.raises(WriterError, match="not JSON") as raised:
        await writer_for(anthropic).write(theme=None, seed="s")
    assert raised.value.transient is False


async def test_a_story_cut_off_at_max_tokens_is_permanent(anthropic):
    anthropic.reply_text = json.dumps(SAMPLE_STORY)[:80]
    anthropic.stop_reason = "max_tokens"
    with pytest.raises(WriterError, match="max_tokens") as raised:
        await writer_for(anthropic).write(theme=None, seed="s")
    assert raised.value.transient is False


@pytest.mark.parametrize("status", [500, 503, 529])
async def test_server_errors_and_overload_are_transient(anthropic, status):
    anthropic.fail_next(status=status, message="Overloaded")
    writer = writer_for(anthropic)
    with pytest.raises(WriterError) as raised:
        await writer.write(theme=None, seed="s")
    assert (raised.value.status, raised.value.transient) == (status, True)
    assert "Overloaded" in raised.value.reason
    assert await writer.write(theme=None, seed="s") == SAMPLE_STORY  # the next call succeeds


async def test_429_carries_retry_after(anthropic):
    anthropic.fail_next(status=429, message="Number of request tokens exceeds your limit", headers={"retry-after": "7"})
    with pytest.raises(WriterError) as raised:
        await writer_for(anthropic).write(theme=None, seed="s")
    assert (raised.value.status, raised.value.transient, raised.value.retry_after) == (429, True, 7.0)


async def test_400_is_permanent_with_the_api_message(anthropic):
    anthropic.fail_next(status=400, message="max_tokens: must be less than 64000")
    with pytest.raises(WriterError) as raised:
        await writer_for(anthropic).write(theme=None, seed="s")
    assert (raised.value.status, raised.value.transient) == (400, False)
    assert "max_tokens: must be less than 64000" in raised.value.reason


async def test_a_wrong_key_is_permanent(anthropic):
    with pytest.raises(WriterError) as raised:
        await writer_for(anthropic, api_key="sk-ant-wrong").write(theme=None, seed="s")
    assert (raised.value.status, raised.value.transient) == (401, False)


async def test_slow_api_times_out_as_transient(anthropic):
    anthropic.delay_seconds = 2
    started = time.monotonic()
    with pytest.raises(WriterError, match="timed out") as raised:
        await writer_for(anthropic, timeout=0.2).write(theme=None, seed="s")
    assert raised.value.transient is True
    assert time.monotonic() - started < 1.5


async def test_unreachable_api_is_transient():
    fake = await FakeAnthropic(api_key=KEY).start()
    await fake.stop()
    with pytest.raises(WriterError) as raised:
        await writer_for(fake).write(theme=None, seed="s")
    assert raised.value.transient is True


async def test_the_key_never_reaches_the_logs(anthropic, caplog):
    caplog.set_level(logging.DEBUG)
    anthropic.fail_next(status=529, message="Overloaded")
    anthropic.fail_next(status=400, message="bad request")
    writer = writer_for(anthropic)
    for _ in range(2):
        with pytest.raises(WriterError) as raised:
            await writer.write(theme=None, seed="s")
        assert KEY not in str(raised.value)
    await writer.write(theme=None, seed="s")
    assert caplog.records, "failures should be logged"
    for record in caplog.records:
        assert KEY not in str(record.__dict__)

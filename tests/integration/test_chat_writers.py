"""What both model writers (anthropic, openai) promise, each against its own fake API over real
HTTP on loopback: replies checked and repaired at most twice, truncation and refusals never
parsed as a story, overload retried with backoff honouring retry-after, mistakes not retried."""

from __future__ import annotations

import json
import logging

import pytest

from services.story.domain import content_from_writer
from services.story.writers import AnthropicWriter, OpenAIWriter, WriterError
from services.story.writers.chat import RetryPolicy
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.chat_model import SAMPLE_STORY
from tests.fakes.openai import FakeOpenAI

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-secret-4242"
# Real backoff shape, test-sized waits.
FAST = RetryPolicy(first_delay=0.01, max_delay=0.05)
WRITERS = {
    "anthropic": (FakeAnthropic, AnthropicWriter, "/v1/messages"),
    "openai": (FakeOpenAI, OpenAIWriter, "/v1/chat/completions"),
}


@pytest.fixture(params=sorted(WRITERS))
async def chat(request):
    fake_class, writer_class, path = WRITERS[request.param]
    async with fake_class(api_key=KEY) as fake:
        fake.path = path
        fake.writer = lambda api_key=KEY, **options: writer_class(
            api_key, fake.api_base_url, **{"retry_policy": FAST, **options}
        )
        yield fake


def conversation(request) -> list[dict]:
    """The turns after the system prompt, as the writer sent them."""
    return [message for message in request.json()["messages"] if message["role"] != "system"]


async def write(fake, **options):
    return await fake.writer(**options).write(theme="the drowned choir", seed="user-1\x00request-1")


async def test_a_good_reply_is_one_call_and_a_checked_story(chat):
    story = await write(chat)
    assert story == SAMPLE_STORY
    assert len(chat.requests_to(chat.path)) == 1
    content_from_writer(story)  # the story domain reads it (and ignores gender, admission_date)


@pytest.mark.parametrize(
    ("bad_reply", "problem"),
    [
        ("Here is your story: it was a dark night.", "holds no JSON object"),
        ('{"title": "T", "patient": ', "holds no JSON object"),
        ('{"title": "T" "chapters": []}', "does not parse"),
        (json.dumps({k: v for k, v in SAMPLE_STORY.items() if k != "chapters"}), "lacks chapters"),
        (json.dumps({**SAMPLE_STORY, "patient": {**SAMPLE_STORY["patient"], "gender": "unknown"}}), "patient.gender"),
        (json.dumps({**SAMPLE_STORY, "chapters": SAMPLE_STORY["chapters"][:2]}), "3 to 7 chapters"),
        (json.dumps({**SAMPLE_STORY, "title": "**The Quiet Ward**"}), "title: must be plain prose"),
    ],
)
async def test_an_unusable_reply_is_sent_back_with_the_problem_then_fixed(chat, bad_reply, problem):
    chat.reply_next(bad_reply)

    assert await write(chat) == SAMPLE_STORY

    first, second = chat.requests_to(chat.path)
    assert len(conversation(first)) == 1
    opening, said, follow_up = conversation(second)
    assert opening == conversation(first)[0]
    assert (said["role"], follow_up["role"]) == ("assistant", "user")
    assert said["content"] == bad_reply.strip()
    assert problem in follow_up["content"]


async def test_two_repairs_at_most_then_the_writer_fails_naming_the_problem(chat):
    chat.reply_next(json.dumps({**SAMPLE_STORY, "patient": {"name": "X"}}), count=5)

    with pytest.raises(WriterError) as raised:
        await write(chat)

    assert len(chat.requests_to(chat.path)) == 3
    assert "no usable story after 3 replies" in raised.value.reason
    assert "patient: lacks age" in raised.value.reason
    assert len(conversation(chat.requests_to(chat.path)[-1])) == 5


async def test_a_reply_cut_off_at_the_token_limit_is_never_parsed(chat):
    # Even a cut-off reply that happens to hold a whole JSON object is not taken as a story.
    chat.reply_next(json.dumps({**SAMPLE_STORY, "title": "Cut Short"}), truncated=True)

    assert await write(chat) == SAMPLE_STORY

    follow_up = conversation(chat.requests_to(chat.path)[1])[-1]["content"]
    assert "cut off at the token limit" in follow_up and "shorter" in follow_up


async def test_always_cut_off_fails_after_two_repairs(chat):
    chat.reply_next('{"title": "The', truncated=True, count=3)
    with pytest.raises(WriterError, match="cut off"):
        await write(chat)
    assert len(chat.requests_to(chat.path)) == 3


async def test_a_refusal_ends_the_writing_at_once_and_is_never_parsed(chat):
    chat.reply_next(json.dumps(SAMPLE_STORY), refusal="I can't help with that.")

    with pytest.raises(WriterError, match="refused") as raised:
        await write(chat)

    assert raised.value.transient is False
    assert len(chat.requests_to(chat.path)) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503, 529])
async def test_overload_and_server_errors_are_retried(chat, status):
    chat.fail_next(2, status=status, message="Overloaded")
    assert await write(chat) == SAMPLE_STORY
    assert len(chat.requests_to(chat.path)) == 3


async def test_retry_after_is_honoured(chat):
    chat.fail_next(status=429, message="Rate limited", headers={"retry-after": "1"})

    assert await write(chat) == SAMPLE_STORY

    first, second = chat.requests_to(chat.path)
    assert second.received_at - first.received_at >= 0.95  # the backoff alone would be ~0.01 s


async def test_retries_run_out_with_a_transient_error_naming_the_status(chat):
    chat.fail_next(10, status=529, message="Overloaded")
    with pytest.raises(WriterError) as raised:
        await write(chat)
    assert (raised.value.status, raised.value.transient) == (529, True)
    assert "Overloaded" in raised.value.reason
    assert len(chat.requests_to(chat.path)) == 1 + FAST.max_retries


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_mistakes_are_not_retried(chat, status):
    chat.fail_next(status=status, message="max_tokens: must be less than 64000")
    with pytest.raises(WriterError) as raised:
        await write(chat)
    assert (raised.value.status, raised.value.transient) == (status, False)
    assert "max_tokens: must be less than 64000" in raised.value.reason
    assert len(chat.requests_to(chat.path)) == 1


async def test_a_wrong_key_is_refused_once(chat):
    with pytest.raises(WriterError) as raised:
        await write(chat, api_key="sk-wrong")
    assert (raised.value.status, raised.value.transient) == (401, False)
    assert len(chat.requests_to(chat.path)) == 1


async def test_a_429_for_an_exhausted_quota_is_not_retried(chat):
    if isinstance(chat, FakeAnthropic):
        chat.fail_next(status=429, message="spend limit reached", error_code="enforced_spend_limit_reached")
    else:
        chat.fail_next(status=429, message="You exceeded your current quota", code="insufficient_quota",
                       type_="insufficient_quota")  # fmt: skip
    with pytest.raises(WriterError) as raised:
        await write(chat)
    assert (raised.value.status, raised.value.transient) == (429, False)
    assert len(chat.requests_to(chat.path)) == 1


async def test_a_slow_api_times_out_and_is_retried(chat):
    chat.delay_seconds = 2
    with pytest.raises(WriterError, match="timed out") as raised:
        await write(chat, timeout=0.2, retry_policy=RetryPolicy(max_retries=1, first_delay=0.01))
    assert raised.value.transient is True
    assert len(chat.requests) == 2


async def test_an_unreachable_api_is_transient(chat):
    await chat.stop()
    with pytest.raises(WriterError) as raised:
        await write(chat, retry_policy=RetryPolicy(max_retries=1, first_delay=0.01))
    assert raised.value.transient is True


async def test_the_key_never_reaches_errors_or_logs(chat, caplog):
    caplog.set_level(logging.DEBUG)
    chat.fail_next(status=529, message="Overloaded")
    chat.reply_next("not a story")
    await write(chat)
    chat.fail_next(status=400, message="bad request")
    with pytest.raises(WriterError) as raised:
        await write(chat)
    assert KEY not in str(raised.value) and KEY not in repr(chat.writer())
    assert {"story.writer_call_retried", "story.writer_reply_rejected", "story.writer_request_failed"} <= {
        record.getMessage() for record in caplog.records
    }
    for record in caplog.records:
        assert KEY not in str(record.__dict__)


async def test_the_seed_shapes_the_brief_and_is_never_sent_as_it_is(chat):
    writer = chat.writer()
    await writer.write(theme=None, seed="user-1\x00request-1")
    await writer.write(theme=None, seed="user-1\x00request-1")
    await writer.write(theme=None, seed="user-2\x00request-1")
    first, again, other = (conversation(request)[0]["content"] for request in chat.requests_to(chat.path))
    assert first == again != other
    assert "request-1" not in first and "user-1" not in first
    assert "Choose the theme yourself" in first

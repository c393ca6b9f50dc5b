"""What the two chat-model writers (anthropic, openai) share, so neither copies it.

- post_json: one HTTP call, its failures turned into WriterError (transient or not, with
  the API's own message and retry-after);
- write_story: retries with backoff (429, 529, 5xx, timeouts; honouring retry-after) around
  each call, then the check of the reply, and at most MAX_REPAIRS follow-up turns that show
  the model what was wrong.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from services.story.writers.base import WriterError
from services.story.writers.story_json import GENDERS, StoryJsonError, read_story
from shared.metrics import PROVIDER_RETRIES, ProviderKind, ProviderOutcome, observe_provider_call, retry_reason
from shared.retry import call_with_retries, parse_retry_after

log = logging.getLogger(__name__)

Message = dict[str, str]

MAX_REPAIRS = 2
# Like the vendors' own SDKs: a short first wait, a few retries, a cap on each wait. A
# retry-after longer than the backoff is honoured (call_with_retries takes the larger).
MAX_RETRIES = 3
FIRST_RETRY_DELAY_SECONDS = 0.5
MAX_RETRY_DELAY_SECONDS = 8.0
RETRY_BUDGET_SECONDS = 60.0
# Both SDKs retry these; 529 is Anthropic's "overloaded".
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# A 429 that means "no money left" rather than "too fast": waiting does not help.
QUOTA_ERROR_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "enforced_spend_limit_reached",
    }
)


@dataclass(frozen=True)
class ModelReply:
    text: str
    truncated: bool  # the model hit its token limit: the JSON is unfinished


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = MAX_RETRIES
    first_delay: float = FIRST_RETRY_DELAY_SECONDS
    max_delay: float = MAX_RETRY_DELAY_SECONDS
    budget_seconds: float = RETRY_BUDGET_SECONDS


DEFAULT_RETRY_POLICY = RetryPolicy()
UNUSABLE_REPLY = "unusable_reply"  # the retry reason of a follow-up turn


class WriterTimeout(WriterError):
    """The model did not answer in time (told apart from other network failures in metrics)."""


class ChatWriter:
    """What a model writer is apart from its API: a key, an endpoint, a model, the process's
    HTTP client. Subclasses say how the conversation opens and how one call is made."""

    name = ""
    default_base_url = ""
    default_model = ""

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        model: str | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        self._api_key = api_key
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.model = model or self.default_model
        self._client = client
        self.timeout = timeout
        self._retry_policy = retry_policy

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        messages = self._opening(first_request(theme, seed))
        return await write_story(self.name, self._complete, messages, policy=self._retry_policy)

    def _opening(self, request: str) -> list[Message]:
        raise NotImplementedError

    async def _complete(self, messages: list[Message]) -> ModelReply:
        raise NotImplementedError


async def write_story(
    writer_name: str,
    complete: Callable[[list[Message]], Awaitable[ModelReply]],
    messages: list[Message],
    *,
    policy: RetryPolicy = DEFAULT_RETRY_POLICY,
) -> dict[str, Any]:
    """Asks `complete` for a case file until one passes read_story, at most 1 + MAX_REPAIRS times.

    `complete` makes one call to the model with the conversation so far; a WriterError it
    raises is retried when transient, and otherwise ends the writing at once (a refusal, a
    bad key).
    """
    problem = ""
    for turn in range(1, MAX_REPAIRS + 2):
        reply = await _with_retries(writer_name, functools.partial(complete, messages), policy)
        try:
            if reply.truncated:
                raise StoryJsonError("the reply was cut off at the token limit before the JSON object ended")
            return read_story(reply.text)
        except StoryJsonError as error:
            problem = str(error)
        log.warning("story.writer_reply_rejected", extra={"writer": writer_name, "turn": turn, "error": problem})
        if turn <= MAX_REPAIRS:
            PROVIDER_RETRIES.labels(ProviderKind.WRITER, writer_name, UNUSABLE_REPLY).inc()
        # An empty assistant turn is refused by the Messages API, so an empty reply is named.
        said = reply.text.strip() or "(an empty reply)"
        messages = [*messages, {"role": "assistant", "content": said}, {"role": "user", "content": _repair(problem)}]
    raise WriterError(
        f"{writer_name}: no usable story after {MAX_REPAIRS + 1} replies; the last one: {problem}", transient=True
    )


def first_request(theme: str | None, seed: str) -> str:
    """The opening user turn. The seed picks a gender, an age and an era so that models, which
    left alone write the same patient every time, write different case files."""
    rng = random.Random(seed)
    gender = rng.choice(GENDERS[:2])
    age = rng.randrange(17, 80)
    year = rng.randrange(1860, 1960)
    theme_line = f"The theme: {theme.strip()}." if theme and theme.strip() else "Choose the theme yourself."
    return (
        f"Write a new case file. {theme_line} The patient: {gender}, about {age} years old, "
        f"admitted in {year}. Answer with the JSON object only."
    )


def _repair(problem: str) -> str:
    return (
        f"That reply cannot be used: {problem}. Answer again with the whole case file as one "
        "corrected JSON object, nothing else, keeping to every rule (shorter chapters if it was cut off)."
    )


async def _with_retries(writer_name: str, call: Callable[[], Awaitable[ModelReply]], policy: RetryPolicy) -> ModelReply:
    def on_retry(error: BaseException, retry: int, delay: float) -> None:
        status = error.status if isinstance(error, WriterError) else None
        reason = retry_reason(status, timed_out=isinstance(error, WriterTimeout))
        PROVIDER_RETRIES.labels(ProviderKind.WRITER, writer_name, reason).inc()
        log.warning(
            "story.writer_call_retried",
            extra={"writer": writer_name, "retry": retry, "reason": reason, "delay_seconds": round(delay, 3),
                   "error": str(error)},
        )  # fmt: skip

    return await call_with_retries(
        call,
        budget_seconds=policy.budget_seconds,
        first_delay=policy.first_delay,
        max_delay=policy.max_delay,
        max_retries=policy.max_retries,
        is_transient=lambda error: isinstance(error, WriterError) and error.transient,
        retry_after=lambda error: error.retry_after if isinstance(error, WriterError) else None,
        on_retry=on_retry,
    )


async def post_json(
    writer_name: str,
    client: httpx.AsyncClient | None,
    url: str,
    *,
    headers: dict[str, str],
    body: dict[str, Any],
    timeout: float,
) -> dict[str, Any]:
    """POSTs `body`; the decoded JSON object of a 2xx answer, else WriterError. Each call is
    timed in casefile_provider_call_seconds."""
    with _timed_call(writer_name):
        async with _http_client(client) as http:
            try:
                response = await http.post(url, json=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException:
                raise WriterTimeout(f"{writer_name}: request timed out", transient=True) from None
            except httpx.TransportError as error:
                raise WriterError(f"{writer_name}: {type(error).__name__}", transient=True) from None
        if response.status_code >= 400:
            raise _error_from_response(writer_name, response)
        try:
            reply = response.json()
        except ValueError:
            raise WriterError(f"{writer_name}: response is not JSON", transient=True) from None
        if not isinstance(reply, dict):
            raise WriterError(f"{writer_name}: response is not a JSON object", transient=True)
        return reply


@contextlib.contextmanager
def _timed_call(writer_name: str) -> Iterator[None]:
    started = time.perf_counter()
    outcome = ProviderOutcome.TRANSIENT_ERROR  # also for a cancelled call
    try:
        yield
        outcome = ProviderOutcome.OK
    except WriterError as error:
        outcome = ProviderOutcome.TRANSIENT_ERROR if error.transient else ProviderOutcome.PERMANENT_ERROR
        raise
    finally:
        observe_provider_call(ProviderKind.WRITER, writer_name, outcome, time.perf_counter() - started)


@contextlib.asynccontextmanager
async def _http_client(client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    if client is not None:
        yield client
        return
    async with httpx.AsyncClient() as own:
        yield own


def _error_from_response(writer_name: str, response: httpx.Response) -> WriterError:
    status = response.status_code
    error = api_error(response)
    transient = (status in RETRYABLE_STATUSES or status >= 500) and not _is_out_of_quota(error)
    message = str(error.get("message") or error.get("type") or response.reason_phrase or "")
    log.warning("story.writer_request_failed", extra={"writer": writer_name, "status": status, "error": message})
    return WriterError(
        f"{writer_name}: HTTP {status}: {message}",
        transient=transient,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        status=status,
        api_error=error,
    )


def api_error(response: httpx.Response) -> dict[str, Any]:
    """The error object of a failed call. Anthropic answers {"type": "error", "error": {"type",
    "message"}}, OpenAI {"error": {"message", "type", "param", "code"}}; some compatible servers
    put a string in "error" or the message at the top level."""
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text[:200]}
    if not isinstance(body, dict):
        return {"message": str(body)[:200]}
    error = body.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return {key: body[key] for key in ("message", "type", "code", "param") if key in body}


def _is_out_of_quota(error: dict[str, Any]) -> bool:
    details = error.get("details")
    codes = [error.get("type"), error.get("code"), details.get("error_code") if isinstance(details, dict) else None]
    return any(isinstance(code, str) and code in QUOTA_ERROR_CODES for code in codes)

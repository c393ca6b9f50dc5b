"""The `anthropic` writer: one call to Anthropic's Messages API, answered as a JSON story."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.story.writers.base import WriterError, parse_retry_after

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
# Three chapters of a few paragraphs are about 1,500 words; this leaves room to finish the JSON.
MAX_TOKENS = 4096

SYSTEM_PROMPT = """\
You write short horror stories for a typing game: each is the case file of one patient of \
an old lunatic asylum. Players type the chapters, so use plain ASCII characters only (no \
curly quotes, no dashes longer than a hyphen) and no markdown.

Reply with one JSON object and nothing else, in exactly this shape:
{"title": "...",
 "patient": {"name": "...", "age": 42, "diagnosis": "...", "appearance": "..."},
 "chapters": [{"title": "...", "text": "..."}, {"title": "...", "text": "..."}, {"title": "...", "text": "..."}],
 "image_generation_prompt": "..."}

Rules: exactly three chapters; each chapter text is two to four paragraphs separated by a \
blank line; age is a whole number; image_generation_prompt describes a portrait of the \
patient (face, clothes, light, mood) for an image model, in one or two sentences, with no \
text or lettering in the picture."""


class AnthropicWriter:
    """Writes a story with Claude (https://docs.anthropic.com/en/api/messages)."""

    name = "anthropic"

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        model: str = "claude-sonnet-4-5",
        client: httpx.AsyncClient | None = None,
        timeout: float = 60,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._client = client
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"AnthropicWriter(base_url={self.base_url!r}, model={self.model!r})"

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        reply = await self._create_message(self._request_body(theme, seed))
        return parse_story(_reply_text(reply))

    def _request_body(self, theme: str | None, seed: str) -> dict[str, Any]:
        theme_line = f"Theme: {theme.strip()}." if theme and theme.strip() else "Choose the theme yourself."
        return {
            "model": self.model,
            "max_tokens": MAX_TOKENS,
            "system": SYSTEM_PROMPT,
            "messages": [
                {"role": "user", "content": f"Write case file {seed}. {theme_line} Answer with the JSON object only."}
            ],
        }

    async def _create_message(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {
            "x-api-key": self._api_key,
            "anthropic-version": API_VERSION,
            "content-type": "application/json",
        }
        async with self._http_client() as client:
            try:
                response = await client.post(
                    f"{self.base_url}/v1/messages", json=body, headers=headers, timeout=self.timeout
                )
            except httpx.TimeoutException:
                raise WriterError("anthropic: request timed out", transient=True) from None
            except httpx.TransportError as error:
                raise WriterError(f"anthropic: {type(error).__name__}", transient=True) from None
        if response.status_code >= 400:
            raise _error_from_response(response)
        try:
            return response.json()
        except ValueError:
            raise WriterError("anthropic: response is not JSON", transient=False) from None

    @contextlib.asynccontextmanager
    async def _http_client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with httpx.AsyncClient() as client:
            yield client


def parse_story(text: str) -> dict[str, Any]:
    """Reads the JSON object out of the model's text, tolerating a ```json fence or chatter."""
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    candidate = fenced.group(1) if fenced else text
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0 or end < start:
        raise WriterError("anthropic: the story is not JSON", transient=False)
    try:
        story = json.loads(candidate[start : end + 1])
    except json.JSONDecodeError as error:
        raise WriterError(f"anthropic: the story is not valid JSON ({error.msg})", transient=False) from None
    if not isinstance(story, dict):
        raise WriterError("anthropic: the story is not a JSON object", transient=False)
    return story


def _reply_text(reply: Any) -> str:
    if not isinstance(reply, dict):
        raise WriterError("anthropic: response is not a message", transient=False)
    if reply.get("stop_reason") == "max_tokens":
        raise WriterError("anthropic: the story was cut off at max_tokens", transient=False)
    blocks = reply.get("content")
    if not isinstance(blocks, list):
        raise WriterError("anthropic: response has no content", transient=False)
    return "".join(
        block.get("text", "") for block in blocks if isinstance(block, dict) and block.get("type") == "text"
    )


def _error_from_response(response: httpx.Response) -> WriterError:
    status = response.status_code
    # 529 is Anthropic's "overloaded"; 409 is documented as safe to retry.
    transient = status in (408, 409, 429) or status >= 500
    message = _error_message(response)
    log.warning("anthropic.request_failed", extra={"status": status, "error": message})
    return WriterError(
        f"anthropic: HTTP {status}: {message}",
        transient=transient,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        status=status,
    )


def _error_message(response: httpx.Response) -> str:
    """Anthropic answers errors as {"type": "error", "error": {"type", "message"}}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "")[:200]
    return str(body)[:200]

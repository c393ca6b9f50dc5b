"""The `anthropic` writer: Anthropic's Messages API, answered as a JSON case file.

https://docs.anthropic.com/en/api/messages. The reply's stop_reason decides what it is: a
finished turn is checked as a story; max_tokens (or a full context window) is a story cut
off, sent back for a shorter one; refusal ends the writing, never parsed as a story.
"""

from __future__ import annotations

from typing import Any

import httpx

from services.story.writers.base import WriterError
from services.story.writers.chat import (
    DEFAULT_RETRY_POLICY,
    Message,
    ModelReply,
    RetryPolicy,
    first_request,
    post_json,
    write_story,
)
from services.story.writers.story_json import INSTRUCTIONS

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MODEL = "claude-sonnet-4-5"
API_VERSION = "2023-06-01"
# Seven chapters of up to 300 words are about 3,000 tokens; this leaves room to finish the JSON.
MAX_TOKENS = 8192
FINISHED = frozenset({"end_turn", "stop_sequence"})
CUT_OFF = frozenset({"max_tokens", "model_context_window_exceeded"})


class AnthropicWriter:
    """Writes a story with Claude."""

    name = "anthropic"

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._client = client
        self.timeout = timeout
        self._retry_policy = retry_policy

    def __repr__(self) -> str:
        return f"AnthropicWriter(base_url={self.base_url!r}, model={self.model!r})"

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": first_request(theme, seed)}]
        return await write_story(self.name, self._complete, messages, policy=self._retry_policy)

    async def _complete(self, messages: list[Message]) -> ModelReply:
        reply = await post_json(
            self.name,
            self._client,
            f"{self.base_url}/v1/messages",
            headers={"x-api-key": self._api_key, "anthropic-version": API_VERSION, "content-type": "application/json"},
            body={"model": self.model, "max_tokens": MAX_TOKENS, "system": INSTRUCTIONS, "messages": messages},
            timeout=self.timeout,
        )
        return _model_reply(reply)


def _model_reply(reply: dict[str, Any]) -> ModelReply:
    stop_reason = reply.get("stop_reason")
    if stop_reason == "refusal":
        raise WriterError("anthropic: the model refused to write this case file (stop_reason refusal)", transient=False)
    if stop_reason not in FINISHED | CUT_OFF:
        # tool_use or pause_turn: this writer offers no tools, so the turn is not a story.
        raise WriterError(f"anthropic: unexpected stop_reason {stop_reason!r}", transient=False)
    blocks = reply.get("content")
    if not isinstance(blocks, list):
        raise WriterError("anthropic: response has no content", transient=True)
    text = "".join(
        str(block.get("text", "")) for block in blocks if isinstance(block, dict) and block.get("type") == "text"
    )
    return ModelReply(text=text, truncated=stop_reason in CUT_OFF)

"""The `anthropic` writer: Anthropic's Messages API, answered as a JSON case file.

https://docs.anthropic.com/en/api/messages. The reply's stop_reason decides what it is: a
finished turn is checked as a story; max_tokens (or a full context window) is a story cut
off, sent back for a shorter one; refusal ends the writing, never parsed as a story.
"""

from __future__ import annotations

from typing import Any

from services.story.writers.base import WriterError
from services.story.writers.chat import ChatWriter, Message, ModelReply, post_json
from services.story.writers.story_json import INSTRUCTIONS

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MODEL = "claude-sonnet-4-5"
API_VERSION = "2023-06-01"
# Seven chapters of up to 300 words are about 3,000 tokens; this leaves room to finish the JSON.
MAX_TOKENS = 8192
FINISHED = frozenset({"end_turn", "stop_sequence"})
CUT_OFF = frozenset({"max_tokens", "model_context_window_exceeded"})


class AnthropicWriter(ChatWriter):
    """Writes a story with Claude."""

    name = "anthropic"
    default_base_url = DEFAULT_BASE_URL
    default_model = DEFAULT_MODEL

    def _opening(self, request: str) -> list[Message]:
        return [{"role": "user", "content": request}]  # the instructions go in `system`

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

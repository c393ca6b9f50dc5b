"""The `openai` writer: any OpenAI-compatible chat completions endpoint (OpenAI, OpenRouter,
vLLM, llama.cpp, Ollama, ...), answered as a JSON case file.

https://platform.openai.com/docs/api-reference/chat/create. The story is asked for with
structured output (`response_format: json_schema`, strict). Endpoints differ in what they
take, so the writer steps down when one refuses a parameter by name: a 400 or 422 whose
error names `response_format` (or `json_schema`) moves to `json_object`, then to no
response_format at all (the instructions alone ask for JSON, and the reply is checked
either way); one that names `max_tokens` and `max_completion_tokens` switches to the newer
field. Each step is taken once per process and logged.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any

from services.story.writers.base import WriterError
from services.story.writers.chat import ChatWriter, Message, ModelReply, post_json
from services.story.writers.story_json import INSTRUCTIONS, STORY_SCHEMA

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
# Seven chapters of up to 300 words are about 3,000 tokens; this leaves room to finish the JSON.
MAX_TOKENS = 8192
# Statuses with which endpoints refuse a parameter they do not support.
PARAMETER_REFUSED_STATUSES = frozenset({400, 422})


class ResponseFormat(StrEnum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    NONE = "none"


NEXT_FORMAT = {ResponseFormat.JSON_SCHEMA: ResponseFormat.JSON_OBJECT, ResponseFormat.JSON_OBJECT: ResponseFormat.NONE}


class OpenAIWriter(ChatWriter):
    """Writes a story with a chat completions model."""

    name = "openai"
    default_base_url = DEFAULT_BASE_URL
    default_model = DEFAULT_MODEL

    def __init__(self, api_key: str, base_url: str | None = None, model: str | None = None, **options: Any) -> None:
        super().__init__(api_key, base_url, model, **options)
        # What this endpoint takes, learnt from its refusals (see the module docstring).
        self.response_format = ResponseFormat.JSON_SCHEMA
        self.token_limit_field = "max_tokens"

    def _opening(self, request: str) -> list[Message]:
        return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": request}]

    async def _complete(self, messages: list[Message]) -> ModelReply:
        # Bounded: each refusal of a parameter moves to a smaller request, and there are three.
        while True:
            asked = (self.response_format, self.token_limit_field)
            try:
                reply = await post_json(
                    self.name,
                    self._client,
                    f"{self.base_url}/chat/completions",
                    headers={"authorization": f"Bearer {self._api_key}", "content-type": "application/json"},
                    body=self._request_body(messages),
                    timeout=self.timeout,
                )
            except WriterError as error:
                if not self._adapt_to(error, asked):
                    raise
                continue
            return _model_reply(reply)

    def _request_body(self, messages: list[Message]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, self.token_limit_field: MAX_TOKENS}
        if self.response_format is ResponseFormat.JSON_SCHEMA:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "case_file", "strict": True, "schema": STORY_SCHEMA},
            }
        elif self.response_format is ResponseFormat.JSON_OBJECT:
            body["response_format"] = {"type": "json_object"}
        return body

    def _adapt_to(self, error: WriterError, asked: tuple[ResponseFormat, str]) -> bool:
        """Whether the request should be sent again in a form the endpoint takes."""
        if error.status not in PARAMETER_REFUSED_STATUSES:
            return False
        if (self.response_format, self.token_limit_field) != asked:
            return True  # a concurrent call already adapted
        refused = json.dumps(error.api_error).lower() if error.api_error else error.reason.lower()
        if self.response_format in NEXT_FORMAT and any(
            word in refused for word in ("response_format", "json_schema", "json_object")
        ):
            self._step("response_format", self.response_format, NEXT_FORMAT[self.response_format], error)
            self.response_format = NEXT_FORMAT[self.response_format]
            return True
        if self.token_limit_field == "max_tokens" and "max_completion_tokens" in refused:
            self._step("token_limit_field", "max_tokens", "max_completion_tokens", error)
            self.token_limit_field = "max_completion_tokens"
            return True
        return False

    def _step(self, setting: str, old: str, new: str, error: WriterError) -> None:
        log.warning(
            "story.writer_request_adapted",
            extra={"writer": self.name, "base_url": self.base_url, "setting": setting, "from": old, "to": new,
                   "error": error.reason},
        )  # fmt: skip


def _model_reply(reply: dict[str, Any]) -> ModelReply:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise WriterError("openai: response has no choices", transient=True)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    if message.get("refusal"):
        raise WriterError(f"openai: the model refused to write this case file: {message['refusal']}", transient=False)
    finish_reason = choice.get("finish_reason")
    if finish_reason == "content_filter":
        raise WriterError("openai: the reply was withheld by the content filter (finish_reason content_filter)",
                          transient=False)  # fmt: skip
    return ModelReply(text=_content_text(message.get("content")), truncated=finish_reason == "length")


def _content_text(content: Any) -> str:
    """Content is a string, null (a refusal or a tool call), or on some servers a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""

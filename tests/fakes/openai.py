"""A fake OpenAI-compatible chat completions API (POST /v1/chat/completions).

Shapes as documented at https://platform.openai.com/docs/api-reference/chat/create: a
chat.completion whose choices carry a message (content, refusal) and a finish_reason
(stop, length, content_filter); errors as {"error": {"message", "type", "param", "code"}}.
It can play an endpoint that lacks structured output or the max_tokens field, as older
compatible servers and newer OpenAI models do.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from tests.fakes.chat_model import SAMPLE_REPLY, SAMPLE_STORY, ScriptedReplies
from tests.fakes.http_server import FakeHttpServer

__all__ = ["COMPLETIONS_PATH", "SAMPLE_STORY", "FakeOpenAI", "openai_error"]

COMPLETIONS_PATH = "/v1/chat/completions"

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}  # fmt: skip


def openai_error(status: int, message: str, *, code: str | None = None, param: str | None = None, type_=None) -> dict:
    return {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "api_error"), "param": param,
                      "code": code}}  # fmt: skip


class FakeOpenAI(FakeHttpServer):
    """Answers SAMPLE_STORY unless replies were scripted (fake.replies.reply_next)."""

    def __init__(self, *, api_key: str = "test-openai-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.replies = ScriptedReplies()
        self.response_formats = {"json_schema", "json_object"}  # what this endpoint takes
        self.takes_max_tokens = True
        self.content_filter_next = False

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def reply_next(self, text: str, **options) -> None:
        self.replies.reply_next(text, **options)

    def fail_next(self, count: int = 1, *, status: int, message: str = "scripted failure", headers=None, code=None,
                  type_=None) -> None:  # fmt: skip
        body = openai_error(status, message, code=code, type_=type_)
        super().fail_next(count, status=status, body=body, headers=headers, path_prefix=COMPLETIONS_PATH)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(COMPLETIONS_PATH, self._complete)

    async def _complete(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            error = openai_error(401, "Incorrect API key provided.", code="invalid_api_key")
            return web.json_response(error, status=401)
        body = await request.json()
        refused = self._refused_parameter(body)
        if refused is not None:
            return web.json_response(refused, status=400)
        return web.json_response(self._completion(body))

    def _refused_parameter(self, body: dict) -> dict | None:
        kind = (body.get("response_format") or {}).get("type")
        if kind is not None and kind not in self.response_formats:
            return openai_error(
                400, f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this model.",
                param="response_format",
            )  # fmt: skip
        if "max_tokens" in body and not self.takes_max_tokens:
            return openai_error(
                400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.", param="max_tokens", code="unsupported_parameter",
            )  # fmt: skip
        return None

    def _completion(self, body: dict) -> dict:
        reply = self.replies.take() or SAMPLE_REPLY
        finish_reason = "length" if reply.truncated else "stop"
        if self.content_filter_next:
            self.content_filter_next = False
            finish_reason = "content_filter"
        message = {"role": "assistant", "content": None if reply.refusal else reply.text, "refusal": reply.refusal}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 300, "completion_tokens": 900, "total_tokens": 1200},
        }

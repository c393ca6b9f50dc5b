"""A fake Anthropic Messages API (POST /v1/messages), answering with scripted replies.

Shapes as documented at https://docs.anthropic.com/en/api/messages and /en/api/errors:
a message with `content` blocks and a `stop_reason` (end_turn, max_tokens, refusal, ...);
errors as {"type": "error", "error": {"type", "message"}, "request_id"}.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from tests.fakes.chat_model import SAMPLE_REPLY, SAMPLE_STORY, ScriptedReplies
from tests.fakes.http_server import FakeHttpServer

__all__ = ["MESSAGES_PATH", "SAMPLE_STORY", "FakeAnthropic", "anthropic_error"]

MESSAGES_PATH = "/v1/messages"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str, *, error_code: str | None = None) -> dict:
    error = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
    if error_code is not None:  # e.g. a 429 for a spend limit: {"details": {"error_code": ...}}
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error, "request_id": f"req_{uuid.uuid4().hex[:24]}"}


class FakeAnthropic(FakeHttpServer):
    """`reply_text` / `stop_reason` answer every call unless replies were scripted."""

    def __init__(self, *, api_key: str = "test-anthropic-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.replies = ScriptedReplies()
        self.reply_text = SAMPLE_REPLY.text
        self.stop_reason = "end_turn"

    @property
    def api_base_url(self) -> str:
        return self.base_url

    def reply_next(self, text: str, **options) -> None:
        self.replies.reply_next(text, **options)

    def fail_next(
        self, count: int = 1, *, status: int, message: str = "scripted failure", headers=None, error_code=None
    ) -> None:
        body = anthropic_error(status, message, error_code=error_code)
        super().fail_next(count, status=status, body=body, headers=headers, path_prefix=MESSAGES_PATH)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(MESSAGES_PATH, self._create_message)

    async def _create_message(self, request: web.Request) -> web.Response:
        if request.headers.get("x-api-key") != self.api_key:
            return web.json_response(anthropic_error(401, "invalid x-api-key"), status=401)
        body = await request.json()
        scripted = self.replies.take()
        if scripted is None:
            text, stop_reason = self.reply_text, self.stop_reason
        else:
            text = scripted.text
            stop_reason = "refusal" if scripted.refusal else "max_tokens" if scripted.truncated else "end_turn"
        return web.json_response(
            {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [{"type": "text", "text": text}] if text else [],
                "stop_reason": stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": 250, "output_tokens": 900},
            }
        )

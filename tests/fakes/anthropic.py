"""A fake Anthropic Messages API (POST /v1/messages) whose answer is a JSON story."""

from __future__ import annotations

import json
import uuid

from aiohttp import web

from tests.fakes.http_server import FakeHttpServer

MESSAGES_PATH = "/v1/messages"

SAMPLE_STORY = {
    "title": "The Quiet Ward",
    "patient": {
        "name": "Agnes Marsh",
        "age": 34,
        "diagnosis": "melancholia",
        "appearance": "gaunt, grey-eyed, in a stained gown",
    },
    "chapters": [
        {"title": "Admission", "text": "She came in the rain.\n\nNobody signed for her."},
        {"title": "Observation", "text": "She counts the bars.\n\nThere are always more."},
        {"title": "The Last Entry", "text": "The bed was made.\n\nThe window was painted shut."},
    ],
    "image_generation_prompt": "Portrait of a gaunt woman in a stained asylum gown, gaslight",
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict:
    """The error body Anthropic documents: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


class FakeAnthropic(FakeHttpServer):
    """Answers every message with `reply_text` (by default SAMPLE_STORY as JSON)."""

    def __init__(self, *, api_key: str = "test-anthropic-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.reply_text = json.dumps(SAMPLE_STORY)
        self.stop_reason = "end_turn"

    def fail_next(self, count: int = 1, *, status: int, message: str = "scripted failure", headers=None) -> None:
        super().fail_next(
            count, status=status, body=anthropic_error(status, message), headers=headers, path_prefix=MESSAGES_PATH
        )

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(MESSAGES_PATH, self._create_message)

    async def _create_message(self, request: web.Request) -> web.Response:
        if request.headers.get("x-api-key") != self.api_key:
            return web.json_response(anthropic_error(401, "invalid x-api-key"), status=401)
        body = await request.json()
        return web.json_response(
            {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [{"type": "text", "text": self.reply_text}],
                "stop_reason": self.stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": 250, "output_tokens": 900},
            }
        )

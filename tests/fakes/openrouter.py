"""A fake OpenRouter: POST /api/v1/chat/completions answering image models' completions.

Shapes as documented at https://openrouter.ai/docs: choices[0].message.images[] of
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}, `usage.cost` in
credits; errors {"error": {"code", "message", "metadata"}} with the same status, or inside a
200 body once the model had started; 403 with moderation metadata (reasons, flagged_input).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

from aiohttp import web

from tests.fakes.gemini import ASPECT_SIZES
from tests.fakes.image_api import ImageApiFake, b64_png

COMPLETIONS_PATH = "/api/v1/chat/completions"
IMAGE_MODELS = {"google/gemini-2.5-flash-image"}
COST_PER_IMAGE = "0.0387"


def openrouter_error(code: int, message: str, metadata: dict | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    return {"error": error}


class FakeOpenRouter(ImageApiFake):
    def __init__(self, *, api_key: str = "test-openrouter-key") -> None:
        super().__init__()
        self.api_key = api_key
        # Scripted answers: "error_in_body", "moderation", "no_image", "out_of_credits".
        self.script: deque[str] = deque()

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/api/v1"

    def completion_requests(self) -> list:
        return self.requests_to(COMPLETIONS_PATH)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(COMPLETIONS_PATH, self._complete)

    async def _complete(self, request: web.Request) -> web.Response:
        outage = self.outage_response()
        if outage is not None:
            return outage
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(openrouter_error(401, "No auth credentials found"), status=401)
        body = await request.json()
        if body.get("model") not in IMAGE_MODELS:
            return web.json_response(openrouter_error(400, f"{body.get('model')} is not a valid model ID"), status=400)
        if "image" not in (body.get("modalities") or []):
            return web.json_response(openrouter_error(400, "modalities must include image for this model"), status=400)
        scripted = self.script.popleft() if self.script else None
        if scripted == "out_of_credits":
            error = openrouter_error(402, "Insufficient credits. Add more using https://openrouter.ai/credits")
            return web.json_response(error, status=402)
        if scripted == "moderation":
            metadata = {"reasons": ["violence/graphic"], "flagged_input": str(body["messages"][-1])[:100],
                        "provider_name": "google-ai-studio", "model_slug": body["model"]}  # fmt: skip
            return web.json_response(openrouter_error(403, "Your input was flagged", metadata), status=403)
        if scripted == "error_in_body":
            return web.json_response(openrouter_error(502, "Provider returned error", {"provider_name": "google"}))
        ratio = (body.get("image_config") or {}).get("aspect_ratio", "1:1")
        width, height = ASPECT_SIZES.get(ratio, (1024, 1024))
        images = [] if scripted == "no_image" else [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64_png(width, height)}"}}
        ]  # fmt: skip
        content = "I can't help with that." if scripted == "no_image" else "Here is your picture."
        return web.json_response({
            "id": f"gen-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "provider": "Google AI Studio",
            "choices": [{"index": 0, "finish_reason": "stop", "native_finish_reason": "STOP",
                         "message": {"role": "assistant", "content": content, "images": images}}],
            "usage": {"prompt_tokens": 14, "completion_tokens": 1299, "total_tokens": 1313,
                      "cost": float(COST_PER_IMAGE) if images else 0.0000042},
        })  # fmt: skip

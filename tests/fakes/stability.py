"""A fake Stability v1 API: POST /v1/generation/{engine_id}/text-to-image.

Shapes as documented in Stability's v1 OpenAPI spec: {"artifacts": [{"base64", "seed",
"finishReason": SUCCESS | CONTENT_FILTERED | ERROR}]}; errors {"id", "name", "message"}
(400 invalid_sdxl_v1_dimensions, 400 invalid_prompts, 401 unauthorized, ...).
"""

from __future__ import annotations

import uuid

from aiohttp import web

from tests.fakes.image_api import ImageApiFake, b64_png

ENGINE = "stable-diffusion-xl-1024-v1-0"
SDXL_SIZES = {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (640, 1536), (768, 1344),
              (832, 1216), (896, 1152)}  # fmt: skip


def stability_error(name: str, message: str) -> dict:
    return {"id": uuid.uuid4().hex, "name": name, "message": message}


class FakeStability(ImageApiFake):
    def __init__(self, *, api_key: str = "test-stability-key") -> None:
        super().__init__()
        self.api_key = api_key
        # Which artifacts (by index) the next answer marks CONTENT_FILTERED.
        self.filtered: set[int] = set()
        self.filtered_words: set[str] = set()

    @property
    def api_base_url(self) -> str:
        return self.base_url

    def generation_requests(self) -> list:
        return self.api_requests("/text-to-image")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/generation/{engine}/text-to-image", self._text_to_image)

    async def _text_to_image(self, request: web.Request) -> web.Response:
        outage = self.outage_response()
        if outage is not None:
            return outage
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(stability_error("unauthorized", "Missing or invalid API key"), status=401)
        if request.match_info["engine"] != ENGINE:
            return web.json_response(stability_error("not_found", "engine not found"), status=404)
        body = await request.json()
        prompts = body.get("text_prompts") or []
        if not prompts or not all(isinstance(p, dict) and p.get("text") for p in prompts):
            return web.json_response(stability_error("invalid_prompts", "text_prompts must not be empty"), status=400)
        if any(word in p["text"] for p in prompts for word in self.filtered_words):
            message = "One or more prompts contains filtered words."
            return web.json_response(stability_error("invalid_prompts", message), status=400)
        size = (body.get("width", 512), body.get("height", 512))
        if size not in SDXL_SIZES:
            allowed = ", ".join(f"{w}x{h}" for w, h in sorted(SDXL_SIZES))
            message = f"for {ENGINE} the allowed dimensions are {allowed}, but we received {size[0]}x{size[1]}"
            return web.json_response(stability_error("invalid_sdxl_v1_dimensions", message), status=400)
        samples = body.get("samples", 1)
        if not isinstance(samples, int) or not 1 <= samples <= 10:
            return web.json_response(stability_error("bad_request", "samples must be 1 to 10"), status=400)
        filtered, self.filtered = self.filtered, set()
        artifacts = [
            {"base64": b64_png(*size), "seed": 1000 + index,
             "finishReason": "CONTENT_FILTERED" if index in filtered else "SUCCESS"}
            for index in range(samples)
        ]  # fmt: skip
        return web.json_response({"artifacts": artifacts})

"""A fake Recraft API (POST /v1/images/generations) that also hosts the images it returns."""

from __future__ import annotations

import base64
import gzip
import io
import json
import time
import uuid

from aiohttp import web
from PIL import Image

from tests.fakes.http_server import FakeHttpServer, ScriptedFault

GENERATIONS_PATH = "/v1/images/generations"


def make_png(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (120, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeRecraft(FakeHttpServer):
    """Speaks Recraft's documented generation API; images live under /files/<id>.png.

    `image_mode` decides what /files serves: "png" (with Content-Length), "png_chunked"
    (streamed, no Content-Length), "gzip" (Content-Encoding: gzip) or "not_image" (HTML).
    """

    def __init__(self, *, api_key: str = "test-recraft-key", image_size: tuple[int, int] | None = (64, 64)) -> None:
        super().__init__()
        self.api_key = api_key
        # None: render at the size the client asked for, like the real service.
        self.image_size = image_size
        self.image_mode = "png"
        self.images: dict[str, bytes] = {}
        # Generation calls whose prompt contains a key get its (status, headers) every time.
        self.fail_prompts: dict[str, tuple[int, dict[str, str]]] = {}

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int,
        message: str = "scripted failure",
        code: str = "scripted_failure",
        headers: dict[str, str] | None = None,
        path_prefix: str = GENERATIONS_PATH,
    ) -> None:
        """Fails the next `count` generation calls with Recraft's {"code", "message"} body."""
        super().fail_next(
            count, status=status, body={"code": code, "message": message}, headers=headers, path_prefix=path_prefix
        )

    def fault_for(self, path: str, body: bytes) -> ScriptedFault | None:
        if path != GENERATIONS_PATH or not self.fail_prompts:
            return None
        try:
            prompt = json.loads(body).get("prompt", "")
        except ValueError:
            return None
        for needle, (status, headers) in self.fail_prompts.items():
            if needle in prompt:
                return ScriptedFault(status, {"code": "scripted_failure", "message": f"failing {needle}"}, dict(headers))
        return None

    def generation_requests(self, prompt_part: str = "") -> list:
        return [r for r in self.requests_to(GENERATIONS_PATH) if prompt_part in r.json().get("prompt", "")]

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def file_url(self, image_id: str) -> str:
        return f"{self.base_url}/files/{image_id}.png"

    def host_image(self, data: bytes) -> str:
        image_id = uuid.uuid4().hex
        self.images[image_id] = data
        return self.file_url(image_id)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(GENERATIONS_PATH, self._generate)
        app.router.add_get("/files/{image_id}.png", self._serve_file)
        app.router.add_get("/redirect/{hops}/{image_id}.png", self._redirect)
        app.router.add_get("/redirect-to", self._redirect_to)

    async def _generate(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"code": "not_authenticated", "message": "Invalid API token"}, status=401)
        body = await request.json()
        count = body.get("n", 1)
        if not isinstance(count, int) or not 1 <= count <= 6:
            return web.json_response({"code": "invalid_n", "message": "n must be between 1 and 6"}, status=400)
        items = [self._image_item(body) for _ in range(count)]
        # Recraft V3 costs 40 API units a raster image.
        return web.json_response({"created": int(time.time()), "credits": 40 * count, "data": items})

    def _image_item(self, body: dict) -> dict:
        data = make_png(*self._size_for(body.get("size", "1024x1024")))
        image_id = uuid.uuid4().hex
        self.images[image_id] = data
        item = {"image_id": image_id}
        if body.get("response_format") == "b64_json":
            item["b64_json"] = base64.b64encode(data).decode()
        else:
            item["url"] = self.file_url(image_id)
        return item

    def _size_for(self, size: str) -> tuple[int, int]:
        if self.image_size is not None:
            return self.image_size
        width, _, height = size.partition("x")
        return int(width), int(height)

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        data = self.images.get(request.match_info["image_id"])
        if data is None:
            return web.Response(status=404, text="no such file")
        if self.image_mode == "not_image":
            return web.Response(text="<html><body>Access denied</body></html>", content_type="text/html")
        if self.image_mode == "png_chunked":
            return await _stream_without_length(request, data)
        if self.image_mode == "gzip":
            return web.Response(
                body=gzip.compress(data), content_type="image/png", headers={"Content-Encoding": "gzip"}
            )
        return web.Response(body=data, content_type="image/png")

    async def _redirect(self, request: web.Request) -> web.Response:
        """/redirect/<n>/<id>.png redirects n times before landing on /files/<id>.png."""
        hops = int(request.match_info["hops"])
        image_id = request.match_info["image_id"]
        target = f"/redirect/{hops - 1}/{image_id}.png" if hops > 1 else f"/files/{image_id}.png"
        raise web.HTTPFound(target)

    async def _redirect_to(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["url"])


async def _stream_without_length(request: web.Request, data: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(data), 256):
        await response.write(data[start : start + 256])
    await response.write_eof()
    return response

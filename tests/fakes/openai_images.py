"""A fake OpenAI Images API: /v1/images/generations, /edits (multipart), /variations.

Shapes as documented at https://platform.openai.com/docs/api-reference/images: answers
{"created", "data": [{"b64_json" | "url", "revised_prompt"}], "usage"}; gpt-image-1 always
answers base64 and rejects response_format; dall-e-3 takes n=1 only; `stream: true` with
`partial_images` answers server-sent events `image_generation.partial_image` (or
`image_edit.partial_image`) and then `.completed`; errors {"error": {"message", "type",
"param", "code"}}, including 429 insufficient_quota and 400 moderation_blocked.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import json
import time
import uuid
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes.image_api import ImageApiFake, b64_png, png_of_size

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
VARIATIONS_PATH = "/v1/images/variations"

SIZES = {
    "dall-e-2": {"256x256", "512x512", "1024x1024"},
    "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"},
    "gpt-image-1": {"1024x1024", "1536x1024", "1024x1536", "auto"},
}
QUALITIES = {"dall-e-2": {"standard"}, "dall-e-3": {"standard", "hd"}, "gpt-image-1": {"low", "medium", "high", "auto"}}
# Output image tokens per quality for 1024x1024 (OpenAI's published table).
OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
SAFETY_MESSAGE = (
    "Your request was rejected as a result of our safety system. Your prompt may contain text that is not "
    "allowed by our safety system."
)


def openai_error(message: str, *, type_: str = "invalid_request_error", code: str | None = None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class FakeOpenAIImages(ImageApiFake):
    def __init__(self, *, api_key: str = "test-openai-key") -> None:
        super().__init__()
        self.api_key = api_key
        # Prompts containing one of these words are refused by the "safety system".
        self.refused_words: set[str] = set()
        # Streams end (without .completed) after this many partial images, when set.
        self.cut_stream_after: int | None = None
        self.stream_error_after: int | None = None
        # When set, the stream waits for it after the first partial image: a client that
        # held previews back until the end would never see the final image.
        self.resume_stream: asyncio.Event | None = None
        # When set, a stream waits for it before its first partial image.
        self.start_stream: asyncio.Event | None = None
        self.multipart_fields: list[dict[str, Any]] = []
        # time.perf_counter() as each partial image event was written, for latency figures.
        self.partial_sent_at: list[float] = []
        # Pictures answered so far: each call's pictures have a colour of their own.
        self.pictures_made = 0
        self.hosted: dict[str, bytes] = {}

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def fail_next(self, count: int = 1, *, status: int, message: str = "scripted failure", code=None,
                  type_: str = "server_error", headers=None) -> None:  # fmt: skip
        body = openai_error(message, type_=type_, code=code)
        super().fail_next(count, status=status, body=body, headers=headers, path_prefix="/v1/images")

    def out_of_quota_next(self, count: int = 1) -> None:
        self.fail_next(
            count, status=429, type_="insufficient_quota", code="insufficient_quota",
            message="You exceeded your current quota, please check your plan and billing details.",
        )  # fmt: skip

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(GENERATIONS_PATH, self._generations)
        app.router.add_post(EDITS_PATH, self._edits)
        app.router.add_post(VARIATIONS_PATH, self._variations)
        app.router.add_get("/files/{name}", self._file)

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = await request.json()
        problem = self._check(body, edits=False)
        if problem is not None:
            return problem
        if body.get("stream"):
            return await self._stream(request, body, "image_generation")
        return web.json_response(self._answer(body))

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        fields = await self._multipart(request)
        image = fields.get("image") or fields.get("image[]")
        if not isinstance(image, bytes):
            return web.json_response(openai_error("Missing required parameter: 'image'.", param="image"), status=400)
        if not _is_png(image):
            return web.json_response(openai_error("Invalid image file or mode for image 1, please check your image file.",
                                                  param="image"), status=400)  # fmt: skip
        mask = fields.get("mask")
        if isinstance(mask, bytes) and (not _is_png(mask) or not _has_alpha(mask)):
            return web.json_response(openai_error("Invalid mask image format - mask must be a PNG with an alpha channel.",
                                                  param="mask"), status=400)  # fmt: skip
        if isinstance(mask, bytes) and _size(mask) != _size(image):
            return web.json_response(openai_error("Invalid mask image format - mask size does not match image size"),
                                     status=400)  # fmt: skip
        body = {key: value for key, value in fields.items() if isinstance(value, str)}
        body["n"] = int(body.get("n", 1))
        body["stream"] = body.get("stream") == "true"
        problem = self._check(body, edits=True)
        if problem is not None:
            return problem
        if body["stream"]:
            return await self._stream(request, body, "image_edit")
        return web.json_response(self._answer(body))

    async def _variations(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        fields = await self._multipart(request)
        if not isinstance(fields.get("image"), bytes):
            return web.json_response(openai_error("Missing required parameter: 'image'.", param="image"), status=400)
        body = {"model": fields.get("model", "dall-e-2"), "n": int(fields.get("n", 1)), "size": fields.get("size", "1024x1024"),
                "response_format": fields.get("response_format", "url")}  # fmt: skip
        return web.json_response(self._answer(body))

    def _refused(self, request: web.Request) -> web.Response | None:
        outage = self.outage_response()
        if outage is not None:
            return outage
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            error = openai_error("Incorrect API key provided: sk-***.", code="invalid_api_key")
            return web.json_response(error, status=401)
        return None

    def _check(self, body: dict[str, Any], *, edits: bool) -> web.Response | None:
        model = body.get("model", "dall-e-2")
        if model not in SIZES:
            return web.json_response(openai_error(f"Invalid model {model}.", param="model"), status=400)
        if any(word in str(body.get("prompt", "")) for word in self.refused_words):
            error = openai_error(SAFETY_MESSAGE, type_="image_generation_user_error", code="moderation_blocked")
            return web.json_response(error, status=400)
        if body.get("size", "1024x1024") not in SIZES[model]:
            return web.json_response(openai_error(f"Invalid size for {model}.", param="size"), status=400)
        if "quality" in body and body["quality"] not in QUALITIES[model]:
            return web.json_response(openai_error(f"Invalid quality for {model}.", param="quality"), status=400)
        if model == "dall-e-3" and int(body.get("n", 1)) != 1:
            return web.json_response(openai_error("You must provide n=1 for this model.", param="n"), status=400)
        if model == "gpt-image-1" and "response_format" in body:
            return web.json_response(openai_error("Unknown parameter: 'response_format'.", param="response_format"),
                                     status=400)  # fmt: skip
        if body.get("stream") and model != "gpt-image-1":
            return web.json_response(openai_error("Streaming is not supported for this model.", param="stream"),
                                     status=400)  # fmt: skip
        if edits and model == "dall-e-3":
            return web.json_response(openai_error("dall-e-3 does not support edits.", param="model"), status=400)
        return None

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model", "dall-e-2")
        width, height = _dimensions(body.get("size", "1024x1024"))
        items = []
        for index in range(int(body.get("n", 1))):
            item: dict[str, Any] = {}
            self.pictures_made += 1
            if model == "gpt-image-1" or body.get("response_format") == "b64_json":
                item["b64_json"] = b64_png(width, height, (20 + index, 30 + self.pictures_made % 200, 40))
            else:
                name = f"{uuid.uuid4().hex}.png"
                self.hosted[name] = png_of_size(width, height)
                item["url"] = f"{self.base_url}/files/{name}"
            if model == "dall-e-3":
                item["revised_prompt"] = f"A detailed picture: {body.get('prompt', '')}"
            items.append(item)
        answer: dict[str, Any] = {"created": int(time.time()), "data": items}
        if model == "gpt-image-1":
            answer["usage"] = self._usage(body, len(items))
        return answer

    def _usage(self, body: dict[str, Any], count: int) -> dict[str, Any]:
        output = OUTPUT_TOKENS[body.get("quality", "auto")] * count
        image_in = 323 if "image" in body or body.get("_edit") else 0
        return {"input_tokens": 50 + image_in, "input_tokens_details": {"text_tokens": 50, "image_tokens": image_in},
                "output_tokens": output, "total_tokens": 50 + image_in + output}  # fmt: skip

    async def _stream(self, request: web.Request, body: dict[str, Any], prefix: str) -> web.StreamResponse:
        width, height = _dimensions(body.get("size", "1024x1024"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        partials = int(body.get("partial_images", 0))
        if self.start_stream is not None:
            await self.start_stream.wait()
        for index in range(partials):
            if self.cut_stream_after is not None and index >= self.cut_stream_after:
                await response.write_eof()
                return response
            if self.stream_error_after is not None and index >= self.stream_error_after:
                await _send_event(response, "error", {"type": "error", "error": {"type": "server_error",
                                  "code": "server_error", "message": "The server had an error"}})  # fmt: skip
                await response.write_eof()
                return response
            event = {"type": f"{prefix}.partial_image", "b64_json": b64_png(max(16, width // 8), max(16, height // 8)),
                     "partial_image_index": index, "created_at": int(time.time()), "size": body.get("size"),
                     "quality": body.get("quality", "auto"), "background": "opaque", "output_format": "png"}  # fmt: skip
            await _send_event(response, event["type"], event)
            self.partial_sent_at.append(time.perf_counter())
            if index == 0 and self.resume_stream is not None:
                await self.resume_stream.wait()
        final = {"type": f"{prefix}.completed", "b64_json": b64_png(width, height), "created_at": int(time.time()),
                 "size": body.get("size"), "quality": body.get("quality", "auto"), "background": "opaque",
                 "output_format": "png", "usage": self._usage(body, 1)}  # fmt: skip
        await _send_event(response, final["type"], final)
        await response.write_eof()
        return response

    async def _multipart(self, request: web.Request) -> dict[str, Any]:
        # The recording middleware has read the body already; parse it as the MIME it is.
        raw = await request.read()
        head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            fields[name] = payload if part.get_filename() is not None else payload.decode()
        fields["_edit"] = "true"
        self.multipart_fields.append(fields)
        return fields

    async def _file(self, request: web.Request) -> web.Response:
        data = self.hosted.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")


async def _send_event(response: web.StreamResponse, name: str, payload: dict[str, Any]) -> None:
    await response.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())


def _dimensions(size: str) -> tuple[int, int]:
    if size == "auto":
        return 1024, 1024
    width, _, height = size.partition("x")
    return int(width), int(height)


def _size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _is_png(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.verify()
    except Exception:  # noqa: BLE001 - Pillow raises many types for a corrupt file
        return False
    return True


def _has_alpha(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info

"""A fake Gemini API: POST /v1beta/models/{model}:generateContent with x-goog-api-key.

Shapes as documented at https://ai.google.dev/api/generate-content: candidates[].content.parts
with {"text"} and {"inlineData": {"mimeType", "data"}}, finishReason, promptFeedback.blockReason,
usageMetadata (1290 image tokens a picture); errors {"error": {"code", "message", "status",
"details"}} with google.rpc QuotaFailure / RetryInfo / ErrorInfo details.
"""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from collections import deque
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes.image_api import ImageApiFake, b64_png

MODEL = "gemini-2.5-flash-image"
# Each aspect ratio and the size Gemini renders it at.
ASPECT_SIZES = {
    "1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184), "4:3": (1184, 864),
    "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768), "21:9": (1536, 672),
}  # fmt: skip
IMAGE_TOKENS = 1290


def google_error(code: int, status: str, message: str, details: list | None = None) -> dict:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def quota_error(quota_id: str, *, retry_delay: str | None = None, quota_value: str = "10") -> dict:
    details: list[dict[str, Any]] = [{
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": quota_id, "quotaDimensions": {"location": "global", "model": MODEL}, "quotaValue": quota_value,
        }],
    }]  # fmt: skip
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    return google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan.", details)


class FakeGemini(ImageApiFake):
    def __init__(self, *, api_key: str = "test-gemini-key") -> None:
        super().__init__()
        self.api_key = api_key
        # Scripted 200 answers that are not pictures: "blocked", "image_safety", "text_only".
        self.refusals: deque[str] = deque()
        # Pictures made so far: each answer's picture has a colour of its own, so a test can
        # tell which earlier picture a conversation sent back.
        self.pictures_made = 0

    @property
    def api_base_url(self) -> str:
        return f"{self.base_url}/v1beta"

    def generate_requests(self) -> list:
        return self.api_requests(":generateContent")

    def quota_next(self, quota_id: str, *, retry_delay: str | None = None, quota_value: str = "10") -> None:
        body = quota_error(quota_id, retry_delay=retry_delay, quota_value=quota_value)
        self.fail_next(status=429, body=body, path_prefix="/v1beta/models/")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{model_and_method}", self._generate_content)

    async def _generate_content(self, request: web.Request) -> web.Response:
        outage = self.outage_response()
        if outage is not None:
            return outage
        model, _, method = request.match_info["model_and_method"].partition(":")
        if request.headers.get("x-goog-api-key") != self.api_key:
            details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]  # fmt: skip
            return web.json_response(
                google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", details),
                status=400,
            )
        if method != "generateContent" or model != MODEL:
            message = f"models/{model} is not found for API version v1beta, or is not supported for {method}."
            return web.json_response(google_error(404, "NOT_FOUND", message), status=404)
        body = await request.json()
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return web.json_response(google_error(400, "INVALID_ARGUMENT", "contents is not specified"), status=400)
        problem = contents_problem(contents)
        if problem is not None:
            return web.json_response(google_error(400, "INVALID_ARGUMENT", problem), status=400)
        config = body.get("generationConfig") or {}
        ratio = (config.get("imageConfig") or {}).get("aspectRatio", "1:1")
        if ratio not in ASPECT_SIZES:
            return web.json_response(google_error(400, "INVALID_ARGUMENT", f"Unsupported aspect ratio {ratio}"), status=400)
        if self.refusals:
            return web.json_response(self._refusal(self.refusals.popleft()))
        width, height = ASPECT_SIZES[ratio]
        self.pictures_made += 1
        parts = [{"text": "Here is the picture you asked for."},
                 {"inlineData": {"mimeType": "image/png", "data": b64_png(width, height, picture_colour(self.pictures_made))}}]  # fmt: skip
        return web.json_response(self._answer(parts, "STOP", contents))

    def _refusal(self, kind: str) -> dict[str, Any]:
        if kind == "blocked":
            return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                    "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12}}  # fmt: skip
        if kind == "image_safety":
            return self._answer([], "IMAGE_SAFETY", [])
        return self._answer([{"text": "I can't make that picture, but I can describe it."}], "STOP", [])

    def _answer(self, parts: list[dict[str, Any]], finish: str, contents: list) -> dict[str, Any]:
        image_tokens = IMAGE_TOKENS if any("inlineData" in part for part in parts) else 0
        prompt_tokens = 12 + 258 * sum(
            1 for content in contents for part in content.get("parts", []) if "inlineData" in part
        )
        return {
            "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": image_tokens + 9,
                "totalTokenCount": prompt_tokens + image_tokens + 9,
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": image_tokens},
                                            {"modality": "TEXT", "tokenCount": 9}],
            },  # fmt: skip
            "modelVersion": MODEL,
            "responseId": uuid.uuid4().hex,
        }


def picture_colour(number: int) -> tuple[int, int, int]:
    """The colour of the fake's `number`th picture (1, 2, ...)."""
    return (90, 20 + number % 200, 30)


def contents_problem(contents: list) -> str | None:
    """What Gemini refuses in `contents`, in its words: each a {"role", "parts"} with text or
    inlineData (base64 of an image) parts; a conversation alternates user and model turns,
    starting and ending with the user."""
    roles = []
    for content in contents:
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list) or not content["parts"]:
            return "* GenerateContentRequest.contents: contents.parts must not be empty."
        role = content.get("role", "user")
        if role not in ("user", "model"):
            return f"Please use a valid role: user, model. Got {role!r}."
        roles.append(role)
        for part in content["parts"]:
            problem = _part_problem(part)
            if problem is not None:
                return problem
    if roles[-1] != "user":
        return "Please ensure that single turn requests end with a user role or the role field is empty."
    if roles[0] != "user" or any(first == second for first, second in zip(roles, roles[1:], strict=False)):
        return "Please ensure that multiturn requests alternate between user and model."
    return None


def _part_problem(part: object) -> str | None:
    if not isinstance(part, dict) or len(part) != 1:
        return "* GenerateContentRequest.contents.parts: a part holds exactly one of text or inlineData."
    if "text" in part:
        return None if isinstance(part["text"], str) else "* GenerateContentRequest.contents.parts.text: must be a string"
    inline = part.get("inlineData")
    if not isinstance(inline, dict) or not str(inline.get("mimeType", "")).startswith("image/"):
        return "* GenerateContentRequest.contents.parts: unsupported part (text or inlineData with an image mimeType)."
    try:
        data = base64.b64decode(inline.get("data", ""), validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (binascii.Error, ValueError, OSError):
        return "Unable to process input image. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"
    return None


def inline_pictures(content: dict) -> list[bytes]:
    """The decoded pictures of one content of a request the fake received."""
    return [base64.b64decode(part["inlineData"]["data"]) for part in content["parts"] if "inlineData" in part]

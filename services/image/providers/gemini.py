"""Google's Gemini API image model (https://ai.google.dev/gemini-api/docs/image-generation).

POST {base}/models/{model}:generateContent with header `x-goog-api-key` (GEMINI_API_KEY or
GOOGLE_API_KEY); body {"contents": [{"role", "parts": [{"text"} | {"inlineData": {"mimeType",
"data"}}]}], "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig":
{"aspectRatio"}}}. The picture comes back in candidates[].content.parts[].inlineData. A
200 is not always a picture: promptFeedback.blockReason, a finishReason of SAFETY /
IMAGE_SAFETY / PROHIBITED_CONTENT, or no image part at all is a content refusal. Multi-turn
edits send the earlier turns as contents (user: prompt and picture, model: the picture it
made). Errors are {"error": {"code", "message", "status", "details"}}: a 429 whose
QuotaFailure is per day (or has a limit of 0) will not pass with a short retry. The cost is
usageMetadata's tokens at Google's published prices.
"""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Any


from services.image.catalog import EditOperation, ProviderName, vendor_model_name
from services.image.providers.base import (
    EditInstructions,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    PreviewCallback,
)
from services.image.providers.errors import (
    ContentRefused,
    FailureKind,
    ProviderAccountUnusable,
    ProviderError,
    ProviderUnavailable,
)
from services.image.providers.http import (
    MAX_BYTES_PER_IMAGE,
    ApiError,
    as_int,
    b64,
    decode_base64,
    error_for_status,
    round_microdollars,
    validate_image,
    VendorClient,
)
from services.image.providers.pictures import aspect_ratio, edit_prompt

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
DEFAULT_TIMEOUT_SECONDS = 120
# Google's prices for gemini-2.5-flash-image, dollars per million tokens.
INPUT_PRICE = Decimal("0.30")
IMAGE_OUTPUT_PRICE = Decimal(30)
TEXT_OUTPUT_PRICE = Decimal("2.50")
REFUSAL_FINISH_REASONS = frozenset(
    {
        "SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
        "RECITATION", "IMAGE_RECITATION",
    }
)  # fmt: skip
ACCOUNT_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "BILLING_DISABLED", "CONSUMER_SUSPENDED"})
_RETRY_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")

class GeminiClient(VendorClient):
    name = ProviderName.GEMINI
    key_variable = "GEMINI_API_KEY (or GOOGLE_API_KEY)"
    default_base_url = DEFAULT_BASE_URL
    default_timeout = DEFAULT_TIMEOUT_SECONDS

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        api_key = self._key()
        model = vendor_model_name(request.model, self.name) or request.model.removeprefix("google/")
        images: list[GeneratedImage] = []
        cost = Decimal(0)
        notes: list[str] = []
        for _ in range(request.count):  # one picture per call: the catalog keeps count at 1
            reply = await self._generate_content(api_key, model, self.request_body(request))
            image, said = await self._image_of(reply)
            images.append(image)
            cost += usage_cost(reply.get("usageMetadata"))
            notes.extend([said] if said else [])
        return GenerationResult(
            tuple(images), provider=self.name, model=request.model, cost_microdollars=round_microdollars(cost),
            notes=tuple(notes),
        )  # fmt: skip

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        config: dict[str, Any] = {"responseModalities": ["TEXT", "IMAGE"]}
        config["imageConfig"] = {"aspectRatio": aspect_ratio(request.width, request.height)}
        return {"contents": _contents(request), "generationConfig": config}

    async def _generate_content(self, api_key: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"x-goog-api-key": api_key, "Content-Type": "application/json"}
        url = f"{self.base_url}/models/{model}:generateContent"
        return await self._post(url, headers=headers, max_bytes=MAX_BYTES_PER_IMAGE, json=body)

    def _classify(self, error: ApiError) -> ProviderError:
        return classify_gemini_error(error)

    async def _image_of(self, reply: dict[str, Any]) -> tuple[GeneratedImage, str]:
        feedback = reply.get("promptFeedback") if isinstance(reply.get("promptFeedback"), dict) else {}
        if feedback.get("blockReason"):
            reason = feedback["blockReason"]
            raise ContentRefused(f"gemini: the prompt was blocked ({reason})", code=str(reason), provider=self.name)
        candidates = reply.get("candidates")
        if not isinstance(candidates, list) or not candidates:
            raise ContentRefused("gemini: no candidate came back", provider=self.name)
        candidate = candidates[0] if isinstance(candidates[0], dict) else {}
        finish = candidate.get("finishReason")
        if finish in REFUSAL_FINISH_REASONS:
            raise ContentRefused(f"gemini: the picture was refused ({finish})", code=str(finish), provider=self.name)
        parts = (candidate.get("content") or {}).get("parts") if isinstance(candidate.get("content"), dict) else None
        parts = [part for part in parts or [] if isinstance(part, dict)]
        said = " ".join(part["text"] for part in parts if isinstance(part.get("text"), str)).strip()[:500]
        inline = next((_inline_image(part) for part in parts if _inline_image(part) is not None), None)
        if inline is None:
            # A 200 without a picture is the model declining (it often says why in text).
            raise ContentRefused(
                f"gemini: no image came back (finish reason {finish})" + (f": {said}" if said else ""),
                code=str(finish), provider=self.name,
            )  # fmt: skip
        data = inline.get("data")
        image = await asyncio.to_thread(lambda: validate_image(decode_base64(data, self.name), self.name))
        return image, said


def classify_gemini_error(error: ApiError) -> ProviderError:
    """The common status table, refined by the google.rpc details Gemini sends."""
    details = [item for item in error.body.get("details") or [] if isinstance(item, dict)]
    reason = f"gemini: HTTP {error.status}: {error.message}"
    options = {"status": error.status, "code": error.code, "provider": "gemini"}
    if any(item.get("reason") in ACCOUNT_REASONS for item in details):
        # Gemini answers a bad key with 400 INVALID_ARGUMENT; it is our key, not the request.
        return ProviderAccountUnusable(reason, **options)
    if error.status == 429:
        if _quota_is_daily_or_zero(details, error.message):
            return ProviderAccountUnusable(f"{reason} (a daily or zero quota: no short retry helps)", **options)
        delay = _retry_delay(details)
        retry_after = max(filter(None, (delay, error.retry_after)), default=None)
        return ProviderUnavailable(reason, retry_after=retry_after, **options)
    if error.status == 400 and error.code == "FAILED_PRECONDITION":
        # E.g. the free tier is not offered in the caller's region: ours to fix.
        return ProviderError(reason, kind=FailureKind.SERVER, **options)
    return error_for_status("gemini", error)


def usage_cost(usage: Any) -> Decimal:
    """Exact micro-dollars for one call's usageMetadata (prompt tokens in, image and text out)."""
    if not isinstance(usage, dict):
        return Decimal(0)
    prompt = as_int(usage.get("promptTokenCount"))
    details = [item for item in usage.get("candidatesTokensDetails") or [] if isinstance(item, dict)]
    if details:
        image_out = sum(as_int(item.get("tokenCount")) for item in details if item.get("modality") == "IMAGE")
        text_out = sum(as_int(item.get("tokenCount")) for item in details if item.get("modality") != "IMAGE")
    else:
        image_out, text_out = as_int(usage.get("candidatesTokenCount")), 0
    # Thinking is billed as text output.
    text_out += as_int(usage.get("thoughtsTokenCount"))
    return Decimal(prompt) * INPUT_PRICE + Decimal(image_out) * IMAGE_OUTPUT_PRICE + Decimal(text_out) * TEXT_OUTPUT_PRICE


def _contents(request: GenerationRequest) -> list[dict[str, Any]]:
    if request.edit is None:
        return [{"role": "user", "parts": [{"text": request.prompt}]}]
    return _edit_contents(request, request.edit)


def _edit_contents(request: GenerationRequest, edit: EditInstructions) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    for turn in edit.history:
        user_parts: list[dict[str, Any]] = [{"text": turn.prompt}]
        if turn.source is not None:
            user_parts.append(_inline_part(turn.source))
        contents.append({"role": "user", "parts": user_parts})
        contents.append({"role": "model", "parts": [_inline_part(turn.result)]})
    parts: list[dict[str, Any]] = [{"text": edit_prompt(edit.operation, request.prompt, request.width, request.height)}]
    # In a chain the source is the model's own last picture, already in the conversation.
    if not edit.history or edit.history[-1].result.data != edit.source.data:
        parts.append(_inline_part(edit.source))
    if edit.mask is not None and edit.operation is EditOperation.INPAINT:
        parts.append(_inline_part(ImageInput(edit.mask, "image/png")))
    contents.append({"role": "user", "parts": parts})
    return contents


def _inline_part(image: ImageInput) -> dict[str, Any]:
    return {"inlineData": {"mimeType": image.content_type, "data": b64(image.data)}}


def _inline_image(part: dict[str, Any]) -> dict[str, Any] | None:
    # The REST API answers in camelCase; snake_case is what some proxies send back.
    inline = part.get("inlineData") or part.get("inline_data")
    if not isinstance(inline, dict):
        return None
    mime = inline.get("mimeType") or inline.get("mime_type") or ""
    return inline if isinstance(mime, str) and mime.startswith("image/") else None


def _quota_is_daily_or_zero(details: list[dict[str, Any]], message: str) -> bool:
    for item in details:
        for violation in item.get("violations") or []:
            if not isinstance(violation, dict):
                continue
            quota_id = str(violation.get("quotaId") or "")
            if "PerDay" in quota_id or str(violation.get("quotaValue")) == "0":
                return True
    return "limit: 0" in message


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    for item in details:
        if str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _RETRY_DELAY.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None

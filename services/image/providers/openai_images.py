"""OpenAI's Images API (https://platform.openai.com/docs/api-reference/images), Bearer OPENAI_API_KEY.

- POST {base}/images/generations, JSON {model, prompt, n, size, quality, ...}: dall-e-2
  (n up to 10), dall-e-3 (n=1, quality standard|hd), gpt-image-1 (quality low|medium|high,
  always base64, `stream: true` with `partial_images` 1..3 sends server-sent events
  `image_generation.partial_image` then `image_generation.completed`).
- POST {base}/images/edits, multipart (image, mask, prompt, model, n, size, quality): gpt-image-1
  and dall-e-2; a multi-turn edit sends the previous turn's result as the image.
- POST {base}/images/variations, multipart (image, n, size): dall-e-2.
Answers are {"created", "data": [{"b64_json" | "url", "revised_prompt"}], "usage"}; errors are
{"error": {"message", "type", "param", "code"}}. A 429 whose code is insufficient_quota is
the account's money running out, not a rate limit; moderation_blocked and
content_policy_violation are the safety system refusing the prompt.
"""

from __future__ import annotations

import asyncio
import io
import json
from decimal import Decimal
from typing import Any

import httpx
from PIL import Image

from services.image.catalog import EditOperation, ProviderName, Quality, vendor_model_name
from services.image.providers.base import (
    EditInstructions,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    Preview,
    PreviewCallback,
    deliver_preview,
)
from services.image.providers.download import ImageDownloader
from services.image.providers.pictures import as_png, edit_prompt, padded_canvas
from services.image.providers.errors import (
    ContentRefused,
    FailureKind,
    InvalidRequest,
    ProviderAccountUnusable,
    ProviderError,
    ProviderUnavailable,
)
from services.image.providers.http import (
    MAX_BYTES_PER_IMAGE,
    ApiError,
    as_int,
    decode_base64,
    decode_base64_images,
    error_for_status,
    iter_sse,
    open_stream,
    read_api_error,
    read_bounded,
    round_microdollars,
    validate_image,
    VendorClient,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# gpt-image-1 at high quality takes a minute or more and says nothing until it is done.
DEFAULT_TIMEOUT_SECONDS = 240
PARTIAL_IMAGES = 2  # 1..3 allowed; two previews show the picture forming without much cost
# What the safety system answers when it refuses a prompt or an image.
CONTENT_REFUSAL_CODES = frozenset({"moderation_blocked", "content_policy_violation", "content_filter"})
# Codes that mean the account, not the request, is the problem.
ACCOUNT_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "invalid_api_key"})

# OpenAI's published price per image, in micro-dollars, by model, quality and size.
PRICE_PER_IMAGE: dict[tuple[str, str | None, str], int] = {
    ("dall-e-2", None, "256x256"): 16_000,
    ("dall-e-2", None, "512x512"): 18_000,
    ("dall-e-2", None, "1024x1024"): 20_000,
    ("dall-e-3", "standard", "1024x1024"): 40_000,
    ("dall-e-3", "standard", "1792x1024"): 80_000,
    ("dall-e-3", "standard", "1024x1792"): 80_000,
    ("dall-e-3", "hd", "1024x1024"): 80_000,
    ("dall-e-3", "hd", "1792x1024"): 120_000,
    ("dall-e-3", "hd", "1024x1792"): 120_000,
    ("gpt-image-1", "low", "1024x1024"): 11_000,
    ("gpt-image-1", "low", "1536x1024"): 16_000,
    ("gpt-image-1", "low", "1024x1536"): 16_000,
    ("gpt-image-1", "medium", "1024x1024"): 42_000,
    ("gpt-image-1", "medium", "1536x1024"): 63_000,
    ("gpt-image-1", "medium", "1024x1536"): 63_000,
    ("gpt-image-1", "high", "1024x1024"): 167_000,
    ("gpt-image-1", "high", "1536x1024"): 250_000,
    ("gpt-image-1", "high", "1024x1536"): 250_000,
}
# gpt-image-1's token prices, dollars per million tokens: what `usage` is billed at.
GPT_IMAGE_TEXT_INPUT = Decimal(5)
GPT_IMAGE_IMAGE_INPUT = Decimal(10)
GPT_IMAGE_OUTPUT = Decimal(40)

class OpenAIImagesClient(VendorClient):
    name = ProviderName.OPENAI
    key_variable = "OPENAI_API_KEY"
    default_base_url = DEFAULT_BASE_URL
    default_timeout = DEFAULT_TIMEOUT_SECONDS

    def __init__(
        self,
        api_key: str | None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        downloader: ImageDownloader,
        client: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        partial_images: int = PARTIAL_IMAGES,
    ) -> None:
        super().__init__(api_key, base_url, client=client, timeout=timeout, downloader=downloader)
        self.partial_images = max(1, min(3, partial_images))

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        api_key = self._key()
        model = _vendor_model(request.model)
        quality = _quality(model, request.quality)
        stream = on_preview is not None and model == "gpt-image-1"
        if stream and request.count != 1:
            raise ValueError("a streamed gpt-image-1 call makes one image; split the job (catalog.images_per_call)")
        path, fields, files = await self._request_for(request, model, quality)
        if stream:
            fields.update(stream=True, partial_images=max(1, min(3, request.partial_images or self.partial_images)))
            reply = await self._stream(api_key, path, fields, files, on_preview)
        else:
            reply = await self._post_fields(api_key, path, fields, files, request.count)
        images = await self._images_from_reply(reply, request.count)
        notes = tuple(item["revised_prompt"] for item in reply["data"] if isinstance(item.get("revised_prompt"), str))
        return GenerationResult(
            images,
            provider=self.name,
            model=request.model,
            cost_microdollars=estimate_cost(model, quality, request.width, request.height, len(images), reply.get("usage")),
            notes=notes,
        )

    async def _request_for(
        self, request: GenerationRequest, model: str, quality: str | None
    ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """The endpoint, its fields, and for edits the files of the multipart body."""
        fields: dict[str, Any] = {"model": model, "n": request.count, "size": f"{request.width}x{request.height}"}
        if quality is not None:
            fields["quality"] = quality
        if model != "gpt-image-1":
            # dall-e answers with a 60-minute URL by default; base64 saves a second download.
            fields["response_format"] = "b64_json"
        if request.edit is None:
            return "/images/generations", {**fields, "prompt": request.prompt}, None
        return await self._edit_request(request, request.edit, model, fields)

    async def _edit_request(
        self, request: GenerationRequest, edit: EditInstructions, model: str, fields: dict[str, Any]
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        if model == "dall-e-2" and edit.operation is EditOperation.VARIATION:
            source = await asyncio.to_thread(_square_png, edit.source.data)
            return "/images/variations", fields, {"image": ("source.png", source, "image/png")}
        if model == "dall-e-2" and edit.operation is not EditOperation.INPAINT:
            raise InvalidRequest(f"openai: dall-e-2 cannot {edit.operation.value}", provider=self.name)
        if model == "dall-e-3":
            raise InvalidRequest("openai: dall-e-3 cannot edit", provider=self.name)
        if edit.operation is EditOperation.OUTPAINT:
            source, mask = await asyncio.to_thread(padded_canvas, edit.source.data, request.width, request.height)
        else:
            convert = _square_png if model == "dall-e-2" else as_png
            source = await asyncio.to_thread(convert, edit.source.data)
            mask = edit.mask
        if edit.operation is EditOperation.REMOVE_BACKGROUND:
            fields["background"] = "transparent"
        files: dict[str, Any] = {"image": ("source.png", source, "image/png")}
        if mask is not None and edit.operation in (EditOperation.INPAINT, EditOperation.OUTPAINT):
            files["mask"] = ("mask.png", mask, "image/png")
        prompt = edit_prompt(edit.operation, request.prompt, request.width, request.height)
        return "/images/edits", {**fields, "prompt": prompt}, files

    async def _post_fields(
        self, api_key: str, path: str, fields: dict[str, Any], files: dict[str, Any] | None, count: int
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}"}
        max_bytes = MAX_BYTES_PER_IMAGE * max(1, count)
        return await self._post(f"{self.base_url}{path}", headers=headers, max_bytes=max_bytes, **_body(fields, files))

    async def _stream(
        self,
        api_key: str,
        path: str,
        fields: dict[str, Any],
        files: dict[str, Any] | None,
        on_preview: PreviewCallback | None,
    ) -> dict[str, Any]:
        """Delivers each partial image as it arrives; the completed event becomes the reply."""
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"}
        async with self._http() as client, open_stream(
            client, "POST", f"{self.base_url}{path}", provider=self.name, timeout=self.timeout,
            headers=headers, **_body(fields, files),
        ) as response:  # fmt: skip
            if response.status_code >= 400:
                body = await read_bounded(response, 64 * 1024, self.name, cut_off=True)
                raise self._classify(read_api_error(response, body))
            async for event in iter_sse(response, self.name):
                payload = _event_payload(event.data, self.name)
                kind = str(payload.get("type") or event.event)
                if kind.endswith(".partial_image"):
                    image = await asyncio.to_thread(_preview_image, payload, self.name)
                    index = as_int(payload.get("partial_image_index"))
                    await deliver_preview(on_preview, Preview(image, index), self.name)
                elif kind.endswith(".completed"):
                    return {"data": [{"b64_json": payload.get("b64_json")}], "usage": payload.get("usage")}
                elif kind == "error" or "error" in payload:
                    raise self._stream_error(payload)
        raise ProviderUnavailable("openai: the stream ended before the image was complete", provider=self.name)

    async def _images_from_reply(self, reply: dict[str, Any], count: int) -> tuple[GeneratedImage, ...]:
        items = reply.get("data")
        if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
            raise ProviderError("openai: response has no image", kind=FailureKind.SERVER, provider=self.name)
        if len(items) > count:
            items = items[:count]  # never more than asked for (and paid)
        if all(item.get("b64_json") for item in items):
            return await decode_base64_images([item["b64_json"] for item in items], self.name)
        if all(item.get("url") for item in items):
            return tuple(await asyncio.gather(*(self._downloader.fetch(item["url"]) for item in items)))
        raise ProviderError("openai: response has neither b64_json nor url", kind=FailureKind.SERVER, provider=self.name)

    def _classify(self, error: ApiError) -> ProviderError:
        return classify_openai_error(error)

    def _stream_error(self, payload: dict[str, Any]) -> ProviderError:
        obj = payload.get("error") if isinstance(payload.get("error"), dict) else payload
        code = obj.get("code") or obj.get("type")
        message = str(obj.get("message") or "error event in the stream")
        # A mid-stream error has no HTTP status; its code says what it is.
        status = 429 if code == "insufficient_quota" else 400 if code in CONTENT_REFUSAL_CODES else 500
        return classify_openai_error(ApiError(status, message, code if isinstance(code, str) else None, obj))


def classify_openai_error(error: ApiError) -> ProviderError:
    """The common status table, refined by OpenAI's documented error codes."""
    codes = {error.code, error.body.get("code"), error.body.get("type")}
    options = {"status": error.status, "code": error.code, "provider": "openai", "retry_after": error.retry_after}
    reason = f"openai: HTTP {error.status}: {error.message}"
    if codes & ACCOUNT_CODES:
        # insufficient_quota comes as a 429, but waiting does not bring the money back.
        return ProviderAccountUnusable(reason, **{**options, "retry_after": None})
    if codes & CONTENT_REFUSAL_CODES or (error.status == 400 and "safety system" in error.message.lower()):
        return ContentRefused(reason, **options)
    return error_for_status("openai", error)


def estimate_cost(
    model: str, quality: str | None, width: int, height: int, images: int, usage: Any
) -> int:
    """OpenAI's own price: gpt-image-1 by the tokens `usage` reports (input text and image,
    output image), else the published price per image by model, quality and size."""
    if model == "gpt-image-1" and isinstance(usage, dict) and usage.get("output_tokens") is not None:
        details = usage.get("input_tokens_details") if isinstance(usage.get("input_tokens_details"), dict) else {}
        text_in = as_int(details.get("text_tokens")) if details else as_int(usage.get("input_tokens"))
        image_in = as_int(details.get("image_tokens")) if details else 0
        total = (
            Decimal(text_in) * GPT_IMAGE_TEXT_INPUT
            + Decimal(image_in) * GPT_IMAGE_IMAGE_INPUT
            + Decimal(as_int(usage.get("output_tokens"))) * GPT_IMAGE_OUTPUT
        )
        return round_microdollars(total)
    return PRICE_PER_IMAGE.get((model, quality, f"{width}x{height}"), 0) * images


def _vendor_model(model: str) -> str:
    return vendor_model_name(model, ProviderName.OPENAI) or model.removeprefix("openai/")


def _quality(model: str, quality: Quality | None) -> str | None:
    if model == "dall-e-3":
        return (quality or Quality.STANDARD).value
    if model == "gpt-image-1":
        return (quality or Quality.MEDIUM).value
    return None  # dall-e-2 knows only "standard", its default


def _body(fields: dict[str, Any], files: dict[str, Any] | None) -> dict[str, Any]:
    if files is None:
        return {"json": fields}
    # Multipart form fields are strings; booleans as the API spells them.
    data = {key: (json.dumps(value) if isinstance(value, bool) else str(value)) for key, value in fields.items()}
    return {"data": data, "files": files}


def _event_payload(data: str, provider: str) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError:
        raise ProviderUnavailable(f"{provider}: a streamed event is not JSON", provider=provider) from None
    if not isinstance(payload, dict):
        raise ProviderUnavailable(f"{provider}: a streamed event is not an object", provider=provider)
    return payload


def _preview_image(payload: dict[str, Any], provider: str) -> GeneratedImage:
    return validate_image(decode_base64(payload.get("b64_json"), provider), provider)


def _square_png(data: bytes) -> bytes:
    """dall-e-2 edits and variations take a square PNG under 4 MB."""
    png = as_png(data)
    with Image.open(io.BytesIO(png)) as image:
        if image.width != image.height:
            raise InvalidRequest("openai: dall-e-2 edits need a square source image", provider="openai")
    if len(png) >= 4 * 1024 * 1024:
        raise InvalidRequest("openai: dall-e-2 edits need a source image under 4 MB", provider="openai")
    return png

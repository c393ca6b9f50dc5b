"""OpenRouter (https://openrouter.ai/docs): POST {base}/chat/completions, Bearer OPENROUTER_API_KEY.

Image models answer a chat completion asked with `modalities: ["image", "text"]`: the images
are base64 data URLs in choices[0].message.images[].image_url.url; `image_config.aspect_ratio`
picks the size. Errors are {"error": {"code", "message", "metadata"}} with the same HTTP
status, except that an error met while the model was already working comes inside a 200
body. 402 (out of credits) is our account's problem, 403 with moderation metadata is the
prompt being flagged; 408/429/502/503 pass. `usage.cost` is what the call cost, in
OpenRouter credits (US dollars).
"""

from __future__ import annotations

import asyncio
from typing import Any


from services.image.catalog import EditOperation, ProviderName, vendor_model_name
from services.image.providers.base import (
    EditInstructions,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    PreviewCallback,
)
from services.image.providers.errors import ContentRefused, FailureKind, ProviderError
from services.image.providers.http import (
    MAX_BYTES_PER_IMAGE,
    ApiError,
    b64,
    data_url,
    decode_data_url,
    dollars_to_microdollars,
    error_for_status,
    validate_image,
    VendorClient,
)
from services.image.providers.pictures import aspect_ratio, edit_prompt

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_TIMEOUT_SECONDS = 180
APP_TITLE = "casefile"
# What providers behind OpenRouter report when their safety filter stopped the picture.
SAFETY_FINISH_REASONS = frozenset(
    {"content_filter", "SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST"}
)

class OpenRouterClient(VendorClient):
    name = ProviderName.OPENROUTER
    key_variable = "OPENROUTER_API_KEY"
    default_base_url = DEFAULT_BASE_URL
    default_timeout = DEFAULT_TIMEOUT_SECONDS

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        api_key = self._key()
        replies = [await self._complete(api_key, self.request_body(request)) for _ in range(request.count)]
        images = []
        for reply in replies:
            images.append(await self._image_of(reply))
        cost = sum(dollars_to_microdollars((reply.get("usage") or {}).get("cost", 0)) for reply in replies)
        notes = tuple(text for reply in replies if (text := _message_text(reply)))
        return GenerationResult(tuple(images), provider=self.name, model=request.model, cost_microdollars=cost, notes=notes)

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": vendor_model_name(request.model, self.name) or request.model,
            "messages": [{"role": "user", "content": _user_content(request)}],
            "modalities": ["image", "text"],
            "stream": False,
        }
        ratio = aspect_ratio(request.width, request.height)
        if ratio != "1:1":
            body["image_config"] = {"aspect_ratio": ratio}
        return body

    async def _complete(self, api_key: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}", "X-Title": APP_TITLE}
        url = f"{self.base_url}/chat/completions"
        reply = await self._post(url, headers=headers, max_bytes=MAX_BYTES_PER_IMAGE, json=body)
        if isinstance(reply.get("error"), dict):
            # The model had started: the status is 200 and the error is in the body.
            error = reply["error"]
            status = error.get("code") if isinstance(error.get("code"), int) else 502
            raise self._classify(ApiError(status, str(error.get("message") or "error"), str(error.get("code")), error))
        return reply

    async def _image_of(self, reply: dict[str, Any]) -> GeneratedImage:
        choice = _first_choice(reply)
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        urls = [
            image["image_url"]["url"]
            for image in message.get("images") or []
            if isinstance(image, dict) and isinstance(image.get("image_url"), dict)
            and isinstance(image["image_url"].get("url"), str)
        ]  # fmt: skip
        if not urls:
            finish = choice.get("native_finish_reason") or choice.get("finish_reason")
            said = _message_text(reply)
            refusal = f"openrouter: no image came back (finish reason {finish})" + (f": {said}" if said else "")
            raise ContentRefused(refusal, code=str(finish), provider=self.name)
        url = urls[0]
        if url.startswith("data:"):
            return await asyncio.to_thread(lambda: validate_image(decode_data_url(url, self.name), self.name))
        return await self._downloader.fetch(url)

    def _classify(self, error: ApiError) -> ProviderError:
        metadata = error.body.get("metadata") if isinstance(error.body.get("metadata"), dict) else {}
        if error.status == 403 and ("reasons" in metadata or "flagged_input" in metadata):
            reasons = ", ".join(str(reason) for reason in metadata.get("reasons") or [])
            return ContentRefused(
                f"openrouter: flagged by moderation: {reasons or error.message}", status=403, provider=self.name
            )
        return error_for_status(self.name, error)


def _user_content(request: GenerationRequest) -> str | list[dict[str, Any]]:
    if request.edit is None:
        return request.prompt
    return _edit_content(request, request.edit)


def _edit_content(request: GenerationRequest, edit: EditInstructions) -> list[dict[str, Any]]:
    text = edit_prompt(edit.operation, request.prompt, request.width, request.height)
    if edit.history:
        # Chat messages carry no images from the assistant, so earlier turns go in as words;
        # the source is already the last turn's picture.
        earlier = "; ".join(turn.prompt for turn in edit.history)
        text = f"{text}\nEarlier edits of this picture, oldest first: {earlier}"
    parts: list[dict[str, Any]] = [
        {"type": "text", "text": text.strip()},
        {"type": "image_url", "image_url": {"url": data_url(edit.source)}},
    ]
    if edit.mask is not None and edit.operation is EditOperation.INPAINT:
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(edit.mask)}"}})
    return parts


def _first_choice(reply: dict[str, Any]) -> dict[str, Any]:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ProviderError("openrouter: answer has no choices", kind=FailureKind.SERVER, provider="openrouter")
    choice = choices[0]
    finish = choice.get("native_finish_reason") or choice.get("finish_reason")
    if isinstance(finish, str) and finish in SAFETY_FINISH_REASONS:
        raise ContentRefused(f"openrouter: the picture was refused ({finish})", code=finish, provider="openrouter")
    return choice


def _message_text(reply: dict[str, Any]) -> str:
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content.strip()[:500] if isinstance(content, str) else ""

"""Recraft's image API (https://www.recraft.ai/docs): POST {base}/images/generations.

Bearer RECRAFT_API_KEY; body {"prompt", "style", "model", "size": "WxH", "n"}; the answer
is {"created", "credits", "data": [{"image_id", "url" | "b64_json"}]}. Image URLs are
fetched through the safe downloader. `credits` is the API units the request cost, at
Recraft's published $1 per 1,000 units. Errors are {"code", "message"}.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from services.image.catalog import ProviderName, vendor_model_name
from services.image.providers.base import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    PortraitAdapter,
    PreviewCallback,
    ProviderError,
)
from services.image.providers.download import ImageDownloader
from services.image.providers.errors import FailureKind
from services.image.providers.http import (
    MAX_BYTES_PER_IMAGE,
    as_int,
    decode_base64_images,
    VendorClient,
)

DEFAULT_BASE_URL = "https://external.api.recraft.ai/v1"
# Recraft sells 1,000 API units for $1: one unit is 1,000 micro-dollars.
MICRODOLLARS_PER_UNIT = 1000
MAX_IMAGES_PER_CALL = 6


class RecraftClient(VendorClient):
    """recraft/recraftv3 (and any Recraft model named directly), up to 6 images per call."""

    name = ProviderName.RECRAFT
    key_variable = "RECRAFT_API_KEY"
    default_base_url = DEFAULT_BASE_URL

    def __init__(
        self,
        api_key: str | None,
        base_url: str = DEFAULT_BASE_URL,
        *,
        downloader: ImageDownloader,
        client: httpx.AsyncClient | None = None,
        style: str = "realistic_image",
        model: str = "recraftv3",
        response_format: str = "url",
        timeout: float = 60,
    ) -> None:
        super().__init__(api_key, base_url, client=client, timeout=timeout, downloader=downloader)
        self.style = style
        self.model = model
        self.response_format = response_format

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        api_key = self._key()
        reply = await self._post_generation(api_key, self._request_body(request))
        images = await self._images_from_reply(reply)
        return GenerationResult(
            images,
            provider=self.name,
            model=request.model,
            cost_microdollars=as_int(reply.get("credits")) * MICRODOLLARS_PER_UNIT,
        )

    def _request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "style": self.style,
            "model": _vendor_model(request.model) or self.model,
            "size": f"{request.width}x{request.height}",
        }
        # One image is Recraft's default; leaving n out keeps the documented four-field body.
        if request.count != 1:
            body["n"] = request.count
        # "url" is Recraft's default too.
        if self.response_format != "url":
            body["response_format"] = self.response_format
        return body

    async def _post_generation(self, api_key: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        max_bytes = MAX_BYTES_PER_IMAGE * max(1, body.get("n", 1))
        return await self._post(f"{self.base_url}/images/generations", headers=headers, max_bytes=max_bytes, json=body)

    async def _images_from_reply(self, reply: dict[str, Any]) -> tuple[GeneratedImage, ...]:
        items = reply.get("data")
        if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
            raise ProviderError("recraft: response has no image", kind=FailureKind.SERVER, provider=self.name)
        if all(item.get("b64_json") for item in items):
            images = await decode_base64_images([item["b64_json"] for item in items], self.name)
            for image in images:
                if len(image.data) > self._downloader.max_bytes:
                    raise ProviderError("recraft: image is too large", kind=FailureKind.SERVER, provider=self.name)
            return images
        if all(item.get("url") for item in items):
            return tuple(await asyncio.gather(*(self._downloader.fetch(item["url"]) for item in items)))
        raise ProviderError("recraft: response has neither url nor b64_json", kind=FailureKind.SERVER, provider=self.name)


class RecraftProvider(PortraitAdapter):
    """The portrait pipeline's `recraft` painter: one recraftv3 image per call."""

    def __init__(self, api_key: str | None, base_url: str = DEFAULT_BASE_URL, **options: Any) -> None:
        self.client = RecraftClient(api_key, base_url, **options)
        super().__init__(self.client, "recraft/recraftv3")
        self.name = "recraft"

    @property
    def base_url(self) -> str:
        return self.client.base_url

    def __repr__(self) -> str:
        return repr(self.client).replace(type(self.client).__name__, type(self).__name__, 1)


def _vendor_model(model: str | None) -> str | None:
    # Jobs name catalog models ("recraft/recraftv3"); a bare name ("recraftv2") is Recraft's own.
    if not model:
        return None
    return vendor_model_name(model, ProviderName.RECRAFT) or model.removeprefix("recraft/")

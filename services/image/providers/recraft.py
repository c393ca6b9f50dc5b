"""Recraft's image API: POST /images/generations, then download the returned URL."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from services.image.providers.base import (
    GeneratedImage,
    ProviderError,
    ProviderNotConfigured,
    parse_retry_after,
)
from services.image.providers.download import ImageDownloader, image_from_bytes

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://external.api.recraft.ai/v1"


class RecraftProvider:
    """Generates one image per call with Recraft (https://www.recraft.ai/docs)."""

    name = "recraft"

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
        self._api_key = api_key or None
        self.base_url = base_url.rstrip("/")
        self._downloader = downloader
        self._client = client
        self.style = style
        self.model = model
        self.response_format = response_format
        self.timeout = timeout

    def __repr__(self) -> str:
        configured = "set" if self._api_key else "missing"
        return f"RecraftProvider(base_url={self.base_url!r}, api_key={configured})"

    async def generate(
        self, *, prompt: str, width: int, height: int, model: str | None = None
    ) -> GeneratedImage:
        if not self._api_key:
            raise ProviderNotConfigured("RECRAFT_API_KEY is not set")
        body = self._request_body(prompt, width, height, model)
        reply = await self._post_generation(body)
        return await self._image_from_reply(reply)

    def _request_body(self, prompt: str, width: int, height: int, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "style": self.style,
            "model": _vendor_model_name(model) or self.model,
            "size": f"{width}x{height}",
        }
        # "url" is Recraft's default; leaving it out keeps the documented four-field body.
        if self.response_format != "url":
            body["response_format"] = self.response_format
        return body

    async def _post_generation(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        async with self._http_client() as client:
            try:
                response = await client.post(
                    f"{self.base_url}/images/generations", json=body, headers=headers, timeout=self.timeout
                )
            except httpx.TimeoutException:
                raise ProviderError("recraft: request timed out", transient=True) from None
            except httpx.TransportError as error:
                raise ProviderError(f"recraft: {type(error).__name__}", transient=True) from None
        if response.status_code >= 400:
            raise _error_from_response(response)
        try:
            return response.json()
        except ValueError:
            raise ProviderError("recraft: response is not JSON", transient=True) from None

    async def _image_from_reply(self, reply: dict[str, Any]) -> GeneratedImage:
        try:
            first = reply["data"][0]
        except (KeyError, IndexError, TypeError):
            raise ProviderError("recraft: response has no image", transient=False) from None
        if isinstance(first, dict) and first.get("b64_json"):
            data = _decode_base64(first["b64_json"])
            if len(data) > self._downloader.max_bytes:
                raise ProviderError("recraft: image is too large", transient=False)
            return await asyncio.to_thread(image_from_bytes, data)
        if isinstance(first, dict) and first.get("url"):
            return await self._downloader.fetch(first["url"])
        raise ProviderError("recraft: response has neither url nor b64_json", transient=False)

    @contextlib.asynccontextmanager
    async def _http_client(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with httpx.AsyncClient() as client:
            yield client


def _vendor_model_name(model: str | None) -> str | None:
    # Jobs name models "recraft/recraftv3"; Recraft itself only knows "recraftv3".
    if not model:
        return None
    return model.split("/", 1)[1] if model.startswith("recraft/") else model


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProviderError("recraft: b64_json is not valid base64", transient=False) from None


def _error_from_response(response: httpx.Response) -> ProviderError:
    status = response.status_code
    transient = status in (408, 409, 429) or status >= 500
    message = _error_message(response)
    log.warning("recraft.request_failed", extra={"status": status, "error": message})
    return ProviderError(
        f"recraft: HTTP {status}: {message}",
        transient=transient,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        status=status,
    )


def _error_message(response: httpx.Response) -> str:
    """Recraft answers errors as {"code", "message"}; tolerate other common shapes too."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            body = error
        for key in ("message", "detail", "error", "code"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
    return str(body)[:200]

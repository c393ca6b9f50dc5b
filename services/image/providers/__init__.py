"""Portrait/image providers behind one interface, chosen by PORTRAIT_PROVIDER."""

from __future__ import annotations

import httpx

from services.image.providers.base import (
    GeneratedImage,
    ImageProvider,
    ProviderError,
    ProviderNotConfigured,
)
from services.image.providers.download import ImageDownloader
from services.image.providers.local import LocalProvider
from services.image.providers.recraft import DEFAULT_BASE_URL as RECRAFT_DEFAULT_BASE_URL
from services.image.providers.recraft import RecraftProvider

__all__ = [
    "GeneratedImage",
    "ImageDownloader",
    "ImageProvider",
    "LocalProvider",
    "PORTRAIT_PROVIDERS",
    "ProviderError",
    "ProviderNotConfigured",
    "RecraftProvider",
    "build_portrait_provider",
]

PORTRAIT_PROVIDERS = ("local", "recraft")


def build_portrait_provider(
    name: str,
    *,
    recraft_api_key: str | None,
    recraft_base_url: str | None,
    allow_private_downloads: bool,
    client: httpx.AsyncClient | None = None,
) -> ImageProvider:
    """Builds the configured provider; a recraft provider without a key is still built.

    Its generate() raises ProviderNotConfigured, so the portrait fails with a clear reason
    instead of the whole service refusing to start.
    """
    choice = name.strip().lower()
    if choice == "local":
        return LocalProvider()
    if choice == "recraft":
        return RecraftProvider(
            recraft_api_key,
            recraft_base_url or RECRAFT_DEFAULT_BASE_URL,
            downloader=ImageDownloader(client, allow_private=allow_private_downloads),
            client=client,
        )
    raise ValueError(
        f"PORTRAIT_PROVIDER: unknown provider {name!r}; expected one of {', '.join(PORTRAIT_PROVIDERS)}"
    )

"""Image providers behind one interface (base.GenerationProvider), and their factories.

Portraits use build_portrait_provider (PORTRAIT_PROVIDER); generation jobs use every
provider whose key is set, through routing.ProviderRouter (build_generation_providers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from services.image.catalog import ProviderName
from services.image.providers.base import (
    ContentRefused,
    EditInstructions,
    EditTurn,
    FailureKind,
    GeneratedImage,
    GenerationProvider,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    ImageProvider,
    InvalidRequest,
    PortraitAdapter,
    Preview,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
)
from services.image.providers.download import HostConnections, ImageDownloader
from services.image.providers.gemini import GeminiClient
from services.image.providers.local import LocalProvider, SketchRenderer
from services.image.providers.openai_images import OpenAIImagesClient
from services.image.providers.openrouter import OpenRouterClient
from services.image.providers.recraft import DEFAULT_BASE_URL as RECRAFT_DEFAULT_BASE_URL
from services.image.providers.recraft import RecraftClient, RecraftProvider
from services.image.providers.stability import StabilityClient

if TYPE_CHECKING:
    from services.image.config import ProviderSettings

__all__ = [
    "ContentRefused",
    "EditInstructions",
    "EditTurn",
    "FailureKind",
    "GeminiClient",
    "GeneratedImage",
    "GenerationProvider",
    "GenerationRequest",
    "GenerationResult",
    "ImageDownloader",
    "ImageInput",
    "ImageProvider",
    "InvalidRequest",
    "LocalProvider",
    "OpenAIImagesClient",
    "OpenRouterClient",
    "PORTRAIT_PROVIDERS",
    "PortraitAdapter",
    "Preview",
    "ProviderAccountUnusable",
    "ProviderError",
    "ProviderNotConfigured",
    "ProviderUnavailable",
    "RecraftClient",
    "RecraftProvider",
    "SketchRenderer",
    "StabilityClient",
    "build_generation_providers",
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
    downloads: HostConnections | None = None,
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
            downloader=ImageDownloader(client, allow_private=allow_private_downloads, connections=downloads),
            client=client,
        )
    raise ValueError(
        f"PORTRAIT_PROVIDER: unknown provider {name!r}; expected one of {', '.join(PORTRAIT_PROVIDERS)}"
    )


def build_generation_providers(
    settings: ProviderSettings,
    *,
    client: httpx.AsyncClient | None = None,
    downloads: HostConnections | None = None,
) -> dict[ProviderName, GenerationProvider]:
    """The built-in renderer, and every vendor client whose key is set (the router's input)."""
    downloader = ImageDownloader(client, allow_private=settings.allow_private_downloads, connections=downloads)
    timeout = settings.request_timeout_seconds
    providers: dict[ProviderName, GenerationProvider] = {ProviderName.LOCAL: SketchRenderer()}
    vendors = {
        ProviderName.OPENAI: (settings.openai, OpenAIImagesClient),
        ProviderName.OPENROUTER: (settings.openrouter, OpenRouterClient),
        ProviderName.GEMINI: (settings.gemini, GeminiClient),
        ProviderName.STABILITY: (settings.stability, StabilityClient),
        ProviderName.RECRAFT: (settings.recraft, RecraftClient),
    }
    for name, (vendor, client_class) in vendors.items():
        if vendor.api_key is not None:
            providers[name] = client_class(
                vendor.api_key.reveal(), vendor.base_url, client=client, timeout=timeout, downloader=downloader
            )
    return providers

"""The one interface every image provider implements, for generation jobs and portraits alike.

    result = await provider.generate(GenerationRequest(model="openai/gpt-image-1", prompt=...,
                                                       width=1024, height=1024, count=2),
                                     on_preview=show_preview)

`generate` returns a GenerationResult (the images with their real dimensions read from the
bytes, who served them, the provider's own cost estimate) or raises a ProviderError whose
`kind` says whether to retry (TRANSIENT) and whether to refund (SERVER) or not (USER).

The portrait pipeline still calls `provider.generate(prompt=, width=, height=)` and gets
one GeneratedImage: PortraitAdapter turns any GenerationProvider into that older shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.image.catalog import EditOperation, ProviderName, Quality
from services.image.providers.errors import (
    MAX_REASON_CHARS,
    ContentRefused,
    FailureKind,
    InvalidRequest,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
    is_transient,
    retry_after_of,
    trim_reason,
)
from shared.retry import parse_retry_after

__all__ = [
    "MAX_REASON_CHARS",
    "ContentRefused",
    "EditInstructions",
    "EditOperation",
    "EditTurn",
    "FailureKind",
    "GeneratedImage",
    "GenerationProvider",
    "GenerationRequest",
    "GenerationResult",
    "ImageInput",
    "ImageProvider",
    "InvalidRequest",
    "PortraitAdapter",
    "Preview",
    "PreviewCallback",
    "ProviderAccountUnusable",
    "ProviderError",
    "ProviderName",
    "ProviderNotConfigured",
    "ProviderUnavailable",
    "Quality",
    "deliver_preview",
    "is_transient",
    "parse_retry_after",
    "retry_after_of",
    "trim_reason",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedImage:
    """One image as the provider made it; width and height are read from the bytes."""

    data: bytes
    content_type: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageInput:
    """An image sent to a provider: an edit's source, or a picture from an earlier turn."""

    data: bytes
    content_type: str = "image/png"


@dataclass(frozen=True)
class EditTurn:
    """An earlier turn of a multi-turn edit chain: what was asked and what came back."""

    prompt: str
    result: ImageInput
    # What that turn started from; None when it was the previous turn's result.
    source: ImageInput | None = None


@dataclass(frozen=True)
class EditInstructions:
    operation: EditOperation
    source: ImageInput
    # INPAINT: a PNG of the source's size whose transparent pixels mark what to repaint.
    mask: bytes | None = None
    # Earlier turns of the chain, oldest first; the source is normally the last one's result.
    history: tuple[EditTurn, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    model: str  # a catalog id, e.g. "openai/gpt-image-1"
    prompt: str
    width: int
    height: int
    count: int = 1
    quality: Quality | None = None  # None: the model's default tier
    edit: EditInstructions | None = None  # None: a new image from the prompt
    # Serve it through this provider only (the router refuses one that does not serve the model).
    provider: ProviderName | None = None
    # Previews to stream to `on_preview` (1 to 3) where the provider can; 0: its default.
    partial_images: int = 0
    # Where in its job each image of this call stands (a job's slots; empty: 0, 1, 2, ...).
    # A painter that draws from a seed (the local one) draws each image of a job apart,
    # however the job is split into calls or resumed after a retry.
    image_numbers: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    provider: ProviderName  # who served it
    model: str  # the catalog id asked for
    # The provider's own estimate of what the call cost us, in millionths of a dollar.
    cost_microdollars: int = 0
    # Images the provider's safety system withheld (Stability filters per image); the
    # rest were delivered. len(images) + refused_count == the request's count.
    refused_count: int = 0
    refused_reason: str = ""
    # What the vendor answered next to the images (a revised prompt, the model's words).
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Preview:
    """A partial image shown while the final one forms: never billed, never stored."""

    image: GeneratedImage
    index: int  # 0, 1, 2... in the order the provider sent them


PreviewCallback = Callable[[Preview], Awaitable[None]]


class GenerationProvider(Protocol):
    name: ProviderName

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        """The request's images, or ProviderError. `on_preview` gets each partial image as
        it arrives where the provider streams; exceptions it raises are logged, not raised."""
        ...


class ImageProvider(Protocol):
    """The portrait pipeline's shape: one image for a prompt and a size."""

    name: str

    async def generate(
        self, *, prompt: str, width: int, height: int, model: str | None = None
    ) -> GeneratedImage: ...


class PortraitAdapter:
    """A GenerationProvider seen as an ImageProvider: one image of `model` per call."""

    def __init__(self, provider: GenerationProvider, model: str) -> None:
        self._provider = provider
        self.model = model
        self.name = str(provider.name)

    async def generate(
        self, *, prompt: str, width: int = 1024, height: int = 1024, model: str | None = None
    ) -> GeneratedImage:
        request = GenerationRequest(model=model or self.model, prompt=prompt, width=width, height=height)
        result = await self._provider.generate(request)
        if not result.images:
            raise ContentRefused(result.refused_reason or f"{self.name}: no image came back", provider=self.name)
        return result.images[0]


async def deliver_preview(on_preview: PreviewCallback | None, preview: Preview, provider: str) -> None:
    """Hands a preview to the caller; a preview that cannot be shown must never cost the image."""
    if on_preview is None:
        return
    try:
        await on_preview(preview)
    except Exception as error:  # CancelledError is a BaseException and still stops the call
        log.warning(
            "provider.preview_dropped",
            extra={"provider": provider, "preview_index": preview.index, "error": f"{type(error).__name__}: {error}"},
        )

"""The model catalog: every model a player can buy, what it costs, what it takes, who serves it.

One place for prices, sizes, per-call limits, edit operations and streaming, and for the
routes to the providers that serve each model (its vendor's own API first, then
OpenRouter where OpenRouter serves it). Pure data and arithmetic: no HTTP, no gRPC.

Prices are in units of a hundredth of a credit (1 credit = 100), exact integers. A price
is per image up to one megapixel; above it x1.5; times the number of images. "One
megapixel" is 1024 x 1024 (1,048,576 pixels): the contract's 1024x1024 images cost the
base price and a dall-e-3 1792x1024 costs 750. Every base price is even, so x1.5 stays exact.

Quality tiers (the contract prices the default tier):
- openai/gpt-image-1: LOW 200, MEDIUM 600 (default), HIGH 2400. OpenAI's own cost per
  1024x1024 image is $0.011 / $0.042 / $0.167; each tier keeps about the margin the contract
  put on MEDIUM, rounded to even hundreds, and LOW never undercuts dall-e-2.
- openai/dall-e-3: STANDARD 500 (default), HD 1000 (OpenAI charges twice as much for HD).
Other models offer no quality choice; naming one is refused rather than silently ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

UNITS_PER_CREDIT = 100
ONE_MEGAPIXEL = 1024 * 1024
MAX_IMAGES_PER_JOB = 10


class Quality(enum.StrEnum):
    STANDARD = "standard"
    HD = "hd"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class EditOperation(enum.StrEnum):
    INPAINT = "inpaint"  # repaint what the mask marks (transparent pixels)
    OUTPAINT = "outpaint"  # extend the picture beyond its borders, to the requested size
    VARIATION = "variation"  # a new picture in the spirit of the source
    REMOVE_BACKGROUND = "remove_background"  # keep the subject on a transparent background
    RESTYLE = "restyle"  # the same picture in the style the prompt describes


ALL_EDIT_OPERATIONS = frozenset(EditOperation)


class ProviderName(enum.StrEnum):
    """Who serves a model: the names ListModels shows in Model.provider."""

    LOCAL = "local"
    RECRAFT = "recraft"
    OPENAI = "openai"
    OPENROUTER = "openrouter"
    GEMINI = "gemini"
    STABILITY = "stability"


class UnsupportedRequest(ValueError):
    """The catalog refuses the request; `field` names the request field to fix."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownModel(UnsupportedRequest):
    def __init__(self, model: str) -> None:
        # The name is the caller's: shown short and printable, never as it came.
        shown = model if len(model) <= 64 and model.isprintable() else repr(model[:16])[:64] + "..."
        super().__init__("model", f"unknown model {shown}; ListModels names the models on offer")


@dataclass(frozen=True)
class Route:
    """One way to reach a model: a provider and the model's name in that provider's API."""

    provider: ProviderName
    vendor_model: str


@dataclass(frozen=True)
class ModelSpec:
    id: str
    # Preferred first: the vendor's own API, then OpenRouter where it serves the model.
    routes: tuple[Route, ...]
    # Price per image up to one megapixel at the default quality (or the only one).
    units_per_image: int
    # Fixed sizes (width, height); empty when any size within min_side..max_side is taken.
    sizes: tuple[tuple[int, int], ...] = ()
    min_side: int = 0
    max_side: int = 0
    max_images_per_call: int = 1
    edit_operations: frozenset[EditOperation] = frozenset()
    supports_stream: bool = False
    max_prompt_chars: int = 4000
    # Price per image for each quality the model offers; empty when it offers no choice.
    quality_units: Mapping[Quality, int] = field(default_factory=dict)
    default_quality: Quality | None = None
    # The vendor edits square sources only (dall-e-2): refused before the charge, not by the vendor.
    square_edit_sources: bool = False

    @property
    def vendor(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def supports_edit(self) -> bool:
        return bool(self.edit_operations)

    @property
    def qualities(self) -> tuple[Quality, ...]:
        return tuple(self.quality_units)

    def allows_size(self, width: int, height: int) -> bool:
        if self.sizes:
            return (width, height) in self.sizes
        return self.min_side <= width <= self.max_side and self.min_side <= height <= self.max_side

    def side_at_fault(self, width: int, height: int) -> str:
        """The field to name for a size it does not offer: height when the width is one it
        offers (in some size, or in range), else width."""
        if self.sizes:
            return "height" if any(w == width for w, _ in self.sizes) else "width"
        return "height" if self.min_side <= width <= self.max_side else "width"

    def route_via(self, provider: ProviderName) -> Route | None:
        return next((route for route in self.routes if route.provider == provider), None)

    def unit_price(self, quality: Quality | None) -> int:
        """Units per image up to one megapixel at `quality` (None: the default)."""
        if not self.quality_units:
            if quality is not None:
                raise UnsupportedRequest("quality", f"{self.id} offers no choice of quality")
            return self.units_per_image
        chosen = quality or self.default_quality
        if chosen not in self.quality_units:
            offered = ", ".join(q.name for q in self.quality_units)
            raise UnsupportedRequest("quality", f"{self.id} offers {offered}")
        return self.quality_units[chosen]

    def effective_quality(self, quality: Quality | None) -> Quality | None:
        """The quality a provider is asked for: the one named, else the model's default."""
        self.unit_price(quality)
        return (quality or self.default_quality) if self.quality_units else None


def price_units(spec: ModelSpec, *, width: int, height: int, num_images: int, quality: Quality | None = None) -> int:
    """What a job costs the player, in hundredths of a credit: per image, x1.5 above one
    megapixel, times the number of images. Exact integer arithmetic."""
    if num_images < 1:
        raise UnsupportedRequest("num_images", "must be at least 1")
    if width < 1 or height < 1:
        raise UnsupportedRequest("width" if width < 1 else "height", "must be positive")
    per_image = spec.unit_price(quality)
    if width * height > ONE_MEGAPIXEL:
        per_image = per_image * 3 // 2
    return per_image * num_images


def images_per_call(spec: ModelSpec, num_images: int, *, streaming: bool = False) -> list[int]:
    """How a job of `num_images` splits into provider calls: [6, 4] for 10 Recraft images.

    A streamed call returns one image (OpenAI's partial-image events carry no image index),
    so a job that shows previews makes one call per image.
    """
    if num_images < 1:
        raise UnsupportedRequest("num_images", "must be at least 1")
    per_call = 1 if streaming and spec.supports_stream else spec.max_images_per_call
    full, rest = divmod(num_images, per_call)
    return [per_call] * full + ([rest] if rest else [])


class ModelCatalog:
    """The models on offer, looked up by id; iteration follows the order they were given."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            _check_spec(spec)
            if spec.id in self._specs:
                raise ValueError(f"model {spec.id} is listed twice")
            self._specs[spec.id] = spec

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs

    def get(self, model_id: str) -> ModelSpec:
        spec = self._specs.get(model_id)
        if spec is None:
            raise UnknownModel(model_id)
        return spec

    def check(
        self,
        model_id: str,
        *,
        width: int,
        height: int,
        num_images: int,
        quality: Quality | None = None,
        operation: EditOperation | None = None,
        prompt: str | None = None,
    ) -> ModelSpec:
        """The model's spec when it offers all of this; UnsupportedRequest naming the field otherwise."""
        spec = self.get(model_id)
        if not spec.allows_size(width, height):
            raise UnsupportedRequest(spec.side_at_fault(width, height),
                                     f"{width}x{height} is not a size {model_id} offers ({describe_sizes(spec)})")  # fmt: skip
        if not 1 <= num_images <= MAX_IMAGES_PER_JOB:
            raise UnsupportedRequest("num_images", f"must be 1 to {MAX_IMAGES_PER_JOB}")
        spec.unit_price(quality)
        if operation is not None and operation not in spec.edit_operations:
            raise UnsupportedRequest("edit_operation", f"{model_id} cannot {operation.value.replace('_', ' ')}")
        if prompt is not None and len(prompt) > spec.max_prompt_chars:
            raise UnsupportedRequest("prompt", f"{model_id} takes at most {spec.max_prompt_chars} characters")
        return spec


def describe_sizes(spec: ModelSpec) -> str:
    if spec.sizes:
        return ", ".join(f"{w}x{h}" for w, h in spec.sizes)
    return f"any width and height from {spec.min_side} to {spec.max_side}"


def _check_spec(spec: ModelSpec) -> None:
    prices = [spec.units_per_image, *spec.quality_units.values()]
    if any(price <= 0 or price % 2 for price in prices):
        raise ValueError(f"{spec.id}: prices must be positive and even, so that x1.5 stays exact")
    if spec.quality_units and spec.quality_units.get(spec.default_quality) != spec.units_per_image:
        raise ValueError(f"{spec.id}: units_per_image must be the default quality's price")
    if not spec.routes or spec.max_images_per_call < 1:
        raise ValueError(f"{spec.id}: needs a route and a per-call limit")


def _route(provider: ProviderName, vendor_model: str) -> Route:
    return Route(provider, vendor_model)


OPENAI_DALL_E_2 = ModelSpec(
    id="openai/dall-e-2",
    routes=(_route(ProviderName.OPENAI, "dall-e-2"),),
    units_per_image=200,
    sizes=((256, 256), (512, 512), (1024, 1024)),
    max_images_per_call=10,
    # /images/edits (with a mask) and /images/variations.
    edit_operations=frozenset({EditOperation.INPAINT, EditOperation.VARIATION}),
    square_edit_sources=True,
    max_prompt_chars=1000,
)
OPENAI_DALL_E_3 = ModelSpec(
    id="openai/dall-e-3",
    routes=(_route(ProviderName.OPENAI, "dall-e-3"),),
    units_per_image=500,
    sizes=((1024, 1024), (1792, 1024), (1024, 1792)),
    max_images_per_call=1,  # OpenAI takes n=1 only for dall-e-3
    max_prompt_chars=4000,
    quality_units={Quality.STANDARD: 500, Quality.HD: 1000},
    default_quality=Quality.STANDARD,
)
OPENAI_GPT_IMAGE_1 = ModelSpec(
    id="openai/gpt-image-1",
    routes=(_route(ProviderName.OPENAI, "gpt-image-1"),),
    units_per_image=600,
    sizes=((1024, 1024), (1536, 1024), (1024, 1536)),
    max_images_per_call=10,
    edit_operations=ALL_EDIT_OPERATIONS,
    supports_stream=True,
    max_prompt_chars=32000,
    quality_units={Quality.LOW: 200, Quality.MEDIUM: 600, Quality.HIGH: 2400},
    default_quality=Quality.MEDIUM,
)
STABILITY_SDXL = ModelSpec(
    id="stability/sdxl",
    # OpenRouter serves no Stability model, so SDXL has its vendor's route only.
    routes=(_route(ProviderName.STABILITY, "stable-diffusion-xl-1024-v1-0"),),
    units_per_image=300,
    # The only dimensions the v1 API takes for stable-diffusion-xl-1024-v1-0.
    sizes=(
        (1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640),
        (640, 1536), (768, 1344), (832, 1216), (896, 1152),
    ),  # fmt: skip
    max_images_per_call=10,  # `samples` is 1..10
    max_prompt_chars=2000,
)
GOOGLE_GEMINI_FLASH_IMAGE = ModelSpec(
    id="google/gemini-2.5-flash-image",
    routes=(
        _route(ProviderName.GEMINI, "gemini-2.5-flash-image"),
        _route(ProviderName.OPENROUTER, "google/gemini-2.5-flash-image"),
    ),
    units_per_image=400,
    # Gemini's aspect ratios and the size each one renders at.
    sizes=(
        (1024, 1024), (832, 1248), (1248, 832), (864, 1184), (1184, 864),
        (896, 1152), (1152, 896), (768, 1344), (1344, 768), (1536, 672),
    ),  # fmt: skip
    max_images_per_call=1,
    edit_operations=ALL_EDIT_OPERATIONS,  # by conversation: source, mask and earlier turns as parts
    max_prompt_chars=4000,
)
RECRAFT_V3 = ModelSpec(
    id="recraft/recraftv3",
    routes=(_route(ProviderName.RECRAFT, "recraftv3"),),
    units_per_image=400,
    sizes=(
        (1024, 1024), (1365, 1024), (1024, 1365), (1536, 1024), (1024, 1536),
        (1820, 1024), (1024, 1820), (1024, 2048), (2048, 1024), (1434, 1024),
        (1024, 1434), (1024, 1280), (1280, 1024), (1024, 1707), (1707, 1024),
    ),  # fmt: skip
    max_images_per_call=6,  # `n` is 1..6
    max_prompt_chars=1000,
)
LOCAL_SKETCH = ModelSpec(
    id="local/sketch",
    routes=(_route(ProviderName.LOCAL, "sketch"),),
    units_per_image=100,
    min_side=64,
    max_side=2048,
    max_images_per_call=10,
    edit_operations=ALL_EDIT_OPERATIONS,
    supports_stream=True,  # coarse previews first, so the whole system streams with no keys
    max_prompt_chars=4000,
)

CATALOG = ModelCatalog(
    (
        OPENAI_DALL_E_3,
        OPENAI_DALL_E_2,
        OPENAI_GPT_IMAGE_1,
        STABILITY_SDXL,
        GOOGLE_GEMINI_FLASH_IMAGE,
        RECRAFT_V3,
        LOCAL_SKETCH,
    )
)


def vendor_model_name(model_id: str, provider: ProviderName) -> str | None:
    """What `provider`'s API calls the catalog model `model_id`; None when it does not serve it."""
    if model_id not in CATALOG:
        return None
    route = CATALOG.get(model_id).route_via(provider)
    return route.vendor_model if route else None

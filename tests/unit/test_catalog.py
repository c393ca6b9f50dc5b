"""The model catalog and the pure pricing function: exact integers, every rule of the contract."""

from __future__ import annotations

import pytest

from services.image.catalog import (
    CATALOG,
    MAX_IMAGES_PER_JOB,
    EditOperation,
    ModelCatalog,
    ModelSpec,
    ProviderName,
    Quality,
    Route,
    UnknownModel,
    UnsupportedRequest,
    images_per_call,
    price_units,
    vendor_model_name,
)

CONTRACT_PRICES = {
    "openai/dall-e-3": 500, "stability/sdxl": 300, "openai/dall-e-2": 200, "openai/gpt-image-1": 600,
    "google/gemini-2.5-flash-image": 400, "recraft/recraftv3": 400, "local/sketch": 100,
}  # fmt: skip


def test_the_catalog_holds_exactly_the_contracts_models_at_its_prices():
    assert {spec.id: spec.units_per_image for spec in CATALOG} == CONTRACT_PRICES


@pytest.mark.parametrize(("model", "width", "height", "count", "quality", "expected"), [
    ("openai/dall-e-3", 1024, 1024, 1, None, 500),
    ("openai/dall-e-3", 1792, 1024, 1, None, 750),  # above one megapixel: x1.5
    ("openai/dall-e-3", 1024, 1792, 2, Quality.HD, 3000),
    ("openai/dall-e-2", 256, 256, 10, None, 2000),
    ("openai/gpt-image-1", 1024, 1024, 1, Quality.LOW, 200),
    ("openai/gpt-image-1", 1024, 1024, 1, Quality.MEDIUM, 600),
    ("openai/gpt-image-1", 1536, 1024, 3, Quality.HIGH, 10800),
    ("openai/gpt-image-1", 1024, 1536, 1, None, 900),
    ("stability/sdxl", 1344, 768, 4, None, 1200),  # 1,032,192 pixels: not above
    ("google/gemini-2.5-flash-image", 1536, 672, 1, None, 400),
    ("recraft/recraftv3", 2048, 1024, 6, None, 3600),
    ("local/sketch", 1024, 1024, 1, None, 100),  # exactly one megapixel is not above it
    ("local/sketch", 1024, 1025, 1, None, 150),
    ("local/sketch", 2048, 2048, 10, None, 1500),
])  # fmt: skip
def test_price_units(model, width, height, count, quality, expected):
    price = price_units(CATALOG.get(model), width=width, height=height, num_images=count, quality=quality)
    assert price == expected
    assert type(price) is int


def test_every_price_stays_exact_above_one_megapixel():
    for spec in CATALOG:
        for quality in spec.qualities or (None,):
            per_image = spec.unit_price(quality)
            assert price_units(spec, width=2048, height=2048, num_images=1, quality=quality) * 2 == per_image * 3


def test_a_quality_the_model_does_not_offer_is_refused_naming_the_field():
    with pytest.raises(UnsupportedRequest) as raised:
        price_units(CATALOG.get("openai/dall-e-3"), width=1024, height=1024, num_images=1, quality=Quality.HIGH)
    assert raised.value.field == "quality"
    with pytest.raises(UnsupportedRequest, match="no choice of quality"):
        CATALOG.get("recraft/recraftv3").unit_price(Quality.HD)


def test_defaults_are_the_contract_tiers():
    assert CATALOG.get("openai/gpt-image-1").effective_quality(None) is Quality.MEDIUM
    assert CATALOG.get("openai/dall-e-3").effective_quality(None) is Quality.STANDARD
    assert CATALOG.get("local/sketch").effective_quality(None) is None


@pytest.mark.parametrize(("model", "size", "allowed"), [
    ("local/sketch", (64, 2048), True), ("local/sketch", (63, 64), False), ("local/sketch", (2049, 64), False),
    ("stability/sdxl", (1536, 640), True), ("stability/sdxl", (1024, 576), False),
    ("openai/dall-e-3", (1792, 1024), True), ("openai/dall-e-3", (1536, 1024), False),
    ("google/gemini-2.5-flash-image", (1184, 864), True), ("recraft/recraftv3", (1707, 1024), True),
])  # fmt: skip
def test_sizes(model, size, allowed):
    assert CATALOG.get(model).allows_size(*size) is allowed


def test_check_names_the_field_to_fix():
    def field_of(**fields) -> str:
        with pytest.raises(UnsupportedRequest) as raised:
            CATALOG.check(**{"model_id": "openai/dall-e-2", "width": 512, "height": 512, "num_images": 1, **fields})
        return raised.value.field

    assert field_of(model_id="openai/dall-e-9") == "model"
    assert field_of(width=500) == "width"
    assert field_of(height=500) == "height"  # 512 is a width dall-e-2 offers
    assert field_of(width=500, height=500) == "width"
    assert field_of(num_images=0) == field_of(num_images=MAX_IMAGES_PER_JOB + 1) == "num_images"
    assert field_of(quality=Quality.HD) == "quality"
    assert field_of(operation=EditOperation.RESTYLE) == "edit_operation"
    assert field_of(prompt="x" * 1001) == "prompt"
    assert CATALOG.check("openai/dall-e-2", width=512, height=512, num_images=10, operation=EditOperation.INPAINT)


def test_a_side_out_of_a_models_range_is_the_field_named():
    def field_of(width: int, height: int) -> str:
        with pytest.raises(UnsupportedRequest) as raised:
            CATALOG.check("local/sketch", width=width, height=height, num_images=1)
        return raised.value.field

    assert field_of(256, 2049) == field_of(256, 63) == field_of(256, 2**31 - 1) == "height"
    assert field_of(2049, 256) == field_of(63, 2049) == "width"


def test_unknown_models_are_named_safely():
    with pytest.raises(UnknownModel) as raised:
        CATALOG.get("\x00" * 500)
    assert len(str(raised.value)) < 200 and "\x00" not in str(raised.value)


def test_edit_and_stream_capabilities():
    capabilities = {spec.id: (spec.supports_edit, spec.supports_stream) for spec in CATALOG}
    assert capabilities == {
        "openai/dall-e-3": (False, False), "openai/dall-e-2": (True, False), "openai/gpt-image-1": (True, True),
        "stability/sdxl": (False, False), "google/gemini-2.5-flash-image": (True, False),
        "recraft/recraftv3": (False, False), "local/sketch": (True, True),
    }  # fmt: skip
    assert CATALOG.get("openai/dall-e-2").edit_operations == {EditOperation.INPAINT, EditOperation.VARIATION}


@pytest.mark.parametrize(("model", "count", "streaming", "calls"), [
    ("openai/dall-e-3", 3, False, [1, 1, 1]), ("recraft/recraftv3", 10, False, [6, 4]),
    ("openai/gpt-image-1", 10, False, [10]), ("openai/gpt-image-1", 2, True, [1, 1]),
    ("stability/sdxl", 10, True, [10]),  # SDXL does not stream, so nothing changes
])  # fmt: skip
def test_images_per_call(model, count, streaming, calls):
    assert images_per_call(CATALOG.get(model), count, streaming=streaming) == calls


def test_routes_put_the_vendor_first_then_openrouter():
    gemini = CATALOG.get("google/gemini-2.5-flash-image")
    assert [route.provider for route in gemini.routes] == [ProviderName.GEMINI, ProviderName.OPENROUTER]
    assert vendor_model_name("google/gemini-2.5-flash-image", ProviderName.OPENROUTER) == "google/gemini-2.5-flash-image"
    assert vendor_model_name("openai/dall-e-3", ProviderName.OPENROUTER) is None
    assert vendor_model_name("stability/sdxl", ProviderName.STABILITY) == "stable-diffusion-xl-1024-v1-0"


def test_a_catalog_refuses_prices_that_would_not_stay_exact():
    odd = ModelSpec(id="x/odd", routes=(Route(ProviderName.LOCAL, "x"),), units_per_image=301, min_side=1, max_side=9)
    with pytest.raises(ValueError, match="even"):
        ModelCatalog([odd])

"""The `local` portrait provider and the provider factory."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image, ImageChops, ImageStat

from services.image.providers import (
    LocalProvider,
    ProviderError,
    ProviderNotConfigured,
    RecraftProvider,
    build_portrait_provider,
)

pytestmark = pytest.mark.timeout(30)

PROMPT = "Portrait of a gaunt woman in a straitjacket, hollow eyes, dim gaslight"


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_same_inputs_give_byte_identical_png():
    first = await LocalProvider().generate(prompt=PROMPT, width=512, height=512)
    second = await LocalProvider().generate(prompt=PROMPT, width=512, height=512)
    assert first.data == second.data
    assert first.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert first.content_type == "image/png"


async def test_png_carries_no_metadata_chunks():
    image = await LocalProvider().generate(prompt=PROMPT, width=128, height=128)
    for chunk in (b"tIME", b"tEXt", b"iTXt", b"zTXt", b"eXIf"):
        assert chunk not in image.data
    assert decode(image.data).info.keys() <= {"dpi", "gamma"}


async def test_different_prompts_look_visibly_different():
    provider = LocalProvider()
    first = decode((await provider.generate(prompt=PROMPT, width=256, height=256)).data)
    other = decode((await provider.generate(prompt="An old man with stitched lips", width=256, height=256)).data)
    difference = ImageChops.difference(first.convert("RGB"), other.convert("RGB"))
    mean_difference = sum(ImageStat.Stat(difference).mean) / 3
    assert mean_difference > 3, mean_difference


async def test_default_size_is_1024_and_other_sizes_are_respected():
    provider = LocalProvider()
    default = await provider.generate(prompt=PROMPT)
    assert (default.width, default.height) == (1024, 1024)
    assert decode(default.data).size == (1024, 1024)
    tall = await provider.generate(prompt=PROMPT, width=320, height=640, model="local/sketch")
    assert (tall.width, tall.height) == (320, 640)
    assert decode(tall.data).size == (320, 640)


async def test_rendering_does_not_block_the_event_loop():
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    await LocalProvider().generate(prompt=PROMPT, width=2048, height=2048)
    stop.set()
    await ticking
    assert ticks > 5


@pytest.mark.parametrize("size", [(0, 512), (512, 8), (5000, 512)])
async def test_absurd_sizes_are_a_permanent_error(size):
    width, height = size
    with pytest.raises(ProviderError) as raised:
        await LocalProvider().generate(prompt=PROMPT, width=width, height=height)
    assert raised.value.transient is False


async def test_empty_prompt_still_renders():
    image = await LocalProvider().generate(prompt="", width=64, height=64)
    assert decode(image.data).size == (64, 64)


def test_build_portrait_provider_local():
    provider = build_portrait_provider(
        "local", recraft_api_key=None, recraft_base_url=None, allow_private_downloads=False
    )
    assert isinstance(provider, LocalProvider)
    assert provider.name == "local"


async def test_recraft_without_key_is_buildable_and_fails_clearly():
    provider = build_portrait_provider(
        "recraft", recraft_api_key=None, recraft_base_url=None, allow_private_downloads=False
    )
    assert isinstance(provider, RecraftProvider)
    assert provider.base_url == "https://external.api.recraft.ai/v1"
    with pytest.raises(ProviderNotConfigured, match="RECRAFT_API_KEY is not set") as raised:
        await provider.generate(prompt=PROMPT, width=1024, height=1024)
    assert raised.value.transient is False


def test_recraft_repr_hides_the_key():
    provider = build_portrait_provider(
        "recraft",
        recraft_api_key="rk-secret-123",
        recraft_base_url="http://127.0.0.1:9/v1",
        allow_private_downloads=True,
    )
    assert provider.base_url == "http://127.0.0.1:9/v1"
    assert "rk-secret-123" not in repr(provider)


def test_unknown_provider_names_the_variable():
    with pytest.raises(ValueError, match="PORTRAIT_PROVIDER"):
        build_portrait_provider("dalle", recraft_api_key=None, recraft_base_url=None, allow_private_downloads=False)


# ---------------------------------------------------------------- local/sketch for jobs


def sketch_request(**fields):
    from services.image.providers import GenerationRequest

    return GenerationRequest(**{"model": "local/sketch", "prompt": PROMPT, "width": 96, "height": 64, **fields})


async def test_sketch_makes_count_distinct_images_of_the_size_asked():
    from services.image.providers import SketchRenderer

    result = await SketchRenderer().generate(sketch_request(count=3))
    assert [decode(image.data).size for image in result.images] == [(96, 64)] * 3
    assert len({image.data for image in result.images}) == 3
    assert (result.provider, result.cost_microdollars) == ("local", 0)
    again = await SketchRenderer().generate(sketch_request(count=3))
    assert [image.data for image in again.images] == [image.data for image in result.images]


async def test_sketch_streams_coarse_previews_before_the_final_picture():
    from services.image.providers import SketchRenderer

    seen = []

    async def on_preview(preview) -> None:
        seen.append((preview.index, decode(preview.image.data).size))

    result = await SketchRenderer().generate(sketch_request(width=512, height=256), on_preview=on_preview)
    assert seen == [(0, (64, 32)), (1, (128, 64))]
    assert decode(result.images[0].data).size == (512, 256)


@pytest.mark.parametrize("operation", ["inpaint", "outpaint", "variation", "remove_background", "restyle"])
async def test_sketch_runs_every_edit_operation_on_the_source(operation):
    from services.image.catalog import EditOperation
    from services.image.providers import EditInstructions, ImageInput, SketchRenderer
    from tests.fakes.image_api import png_of_size

    source = png_of_size(80, 80, (200, 10, 10))
    edit = EditInstructions(EditOperation(operation), ImageInput(source))
    result = await SketchRenderer().generate(sketch_request(edit=edit))
    [image] = result.images
    picture = decode(image.data)
    assert picture.size == (96, 64)
    plain = decode((await SketchRenderer().generate(sketch_request())).images[0].data)
    assert ImageChops.difference(picture.convert("RGB"), plain.convert("RGB")).getbbox() is not None
    if operation == "remove_background":
        assert picture.mode == "RGBA" and picture.getpixel((0, 0))[3] == 0

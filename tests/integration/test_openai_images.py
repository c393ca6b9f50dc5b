"""OpenAIImagesClient against a fake OpenAI Images API over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from PIL import Image

from services.image.catalog import EditOperation, Quality
from services.image.providers import (
    ContentRefused,
    EditInstructions,
    EditTurn,
    FailureKind,
    GenerationRequest,
    ImageDownloader,
    ImageInput,
    OpenAIImagesClient,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
)
from tests.fakes.image_api import png_of_size
from tests.fakes.openai_images import EDITS_PATH, GENERATIONS_PATH, VARIATIONS_PATH, FakeOpenAIImages

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-openai-5151"
PROMPT = "A ward at night, one bed lit by a candle"


@pytest.fixture
async def openai():
    async with FakeOpenAIImages(api_key=KEY) as fake:
        yield fake


def client_for(fake: FakeOpenAIImages, api_key: str | None = KEY, **options) -> OpenAIImagesClient:
    return OpenAIImagesClient(api_key, fake.api_base_url, downloader=ImageDownloader(allow_private=True), **options)


def request(model: str = "openai/dall-e-3", width: int = 1024, height: int = 1024, **fields) -> GenerationRequest:
    return GenerationRequest(model=model, prompt=PROMPT, width=width, height=height, **fields)


def pixels(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_dall_e_3_sends_the_documented_body_and_costs_the_published_price(openai):
    result = await client_for(openai).generate(request(width=1792, height=1024, quality=Quality.HD))

    [call] = openai.requests_to(GENERATIONS_PATH)
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.json() == {
        "model": "dall-e-3", "prompt": PROMPT, "n": 1, "size": "1792x1024", "quality": "hd",
        "response_format": "b64_json",
    }  # fmt: skip
    [image] = result.images
    assert (image.width, image.height) == (1792, 1024) == pixels(image.data)
    assert image.content_type == "image/png"
    assert (result.provider, result.model) == ("openai", "openai/dall-e-3")
    assert result.cost_microdollars == 120_000  # $0.12: HD at 1792x1024
    assert result.notes == (f"A detailed picture: {PROMPT}",)


async def test_dall_e_3_defaults_to_standard_quality(openai):
    result = await client_for(openai).generate(request())
    assert openai.requests_to(GENERATIONS_PATH)[0].json()["quality"] == "standard"
    assert result.cost_microdollars == 40_000


async def test_dall_e_2_makes_several_images_per_call(openai):
    result = await client_for(openai).generate(request("openai/dall-e-2", 256, 256, count=3))

    body = openai.requests_to(GENERATIONS_PATH)[0].json()
    assert (body["n"], body["size"], "quality" in body) == (3, "256x256", False)
    assert [(image.width, image.height) for image in result.images] == [(256, 256)] * 3
    assert result.cost_microdollars == 3 * 16_000


async def test_gpt_image_1_asks_for_its_quality_tier_and_is_costed_by_its_tokens(openai):
    result = await client_for(openai).generate(request("openai/gpt-image-1", 1536, 1024, count=2, quality=Quality.HIGH))

    body = openai.requests_to(GENERATIONS_PATH)[0].json()
    assert body == {"model": "gpt-image-1", "prompt": PROMPT, "n": 2, "size": "1536x1024", "quality": "high"}
    assert [pixels(image.data) for image in result.images] == [(1536, 1024)] * 2
    # 50 text tokens at $5/M and 2 x 4160 output tokens at $40/M, in micro-dollars.
    assert result.cost_microdollars == 50 * 5 + 2 * 4160 * 40


async def test_gpt_image_1_defaults_to_medium(openai):
    await client_for(openai).generate(request("openai/gpt-image-1"))
    assert openai.requests_to(GENERATIONS_PATH)[0].json()["quality"] == "medium"


async def test_a_url_answer_is_downloaded_through_the_safe_downloader(openai):
    client = OpenAIImagesClient(KEY, openai.api_base_url, downloader=ImageDownloader(allow_private=True))
    # response_format is ours to pick; a proxy answering URLs anyway is still served.
    openai.hosted.clear()
    result = await client.generate(request("openai/dall-e-2", 512, 512))
    assert pixels(result.images[0].data) == (512, 512)
    refusing = OpenAIImagesClient(KEY, openai.api_base_url, downloader=ImageDownloader(allow_private=False))
    reply = {"data": [{"url": f"{openai.base_url}/files/x.png"}]}
    with pytest.raises(ProviderError, match="private"):
        await refusing._images_from_reply(reply, 1)


async def test_streaming_hands_over_each_partial_image_as_it_arrives_then_the_final(openai):
    openai.resume_stream = asyncio.Event()
    previews = []

    async def on_preview(preview) -> None:
        previews.append(preview)
        openai.resume_stream.set()  # the fake waits for this before it sends the rest

    result = await client_for(openai).generate(request("openai/gpt-image-1", quality=Quality.LOW), on_preview=on_preview)

    body = openai.requests_to(GENERATIONS_PATH)[0].json()
    assert (body["stream"], body["partial_images"]) == (True, 2)
    assert [preview.index for preview in previews] == [0, 1]
    assert all(pixels(preview.image.data) == (128, 128) for preview in previews)
    assert pixels(result.images[0].data) == (1024, 1024)
    assert result.cost_microdollars == 50 * 5 + 272 * 40  # previews are not billed as images


async def test_a_stream_that_ends_before_the_final_image_is_transient(openai):
    openai.cut_stream_after = 1
    with pytest.raises(ProviderUnavailable, match="before the image was complete") as raised:
        await client_for(openai).generate(request("openai/gpt-image-1"), on_preview=_ignore)
    assert raised.value.kind is FailureKind.TRANSIENT


async def test_an_error_event_in_the_stream_is_transient(openai):
    openai.stream_error_after = 1
    with pytest.raises(ProviderUnavailable) as raised:
        await client_for(openai).generate(request("openai/gpt-image-1"), on_preview=_ignore)
    assert "server had an error" in raised.value.reason


async def test_a_failing_preview_consumer_never_costs_the_image(openai, caplog):
    async def broken(preview) -> None:
        raise RuntimeError("watcher gone")

    result = await client_for(openai).generate(request("openai/gpt-image-1"), on_preview=broken)
    assert len(result.images) == 1
    assert any(record.message == "provider.preview_dropped" for record in caplog.records)


async def test_insufficient_quota_is_the_account_not_a_rate_limit(openai):
    openai.out_of_quota_next()
    with pytest.raises(ProviderAccountUnusable) as raised:
        await client_for(openai).generate(request())
    error = raised.value
    assert (error.status, error.kind, error.transient, error.refundable) == (429, FailureKind.SERVER, False, True)
    assert error.code == "insufficient_quota"
    assert error.retry_after is None


async def test_a_rate_limit_is_transient_with_its_retry_after(openai):
    openai.fail_next(status=429, type_="requests", code="rate_limit_exceeded", message="Rate limit reached",
                     headers={"Retry-After": "7"})  # fmt: skip
    with pytest.raises(ProviderUnavailable) as raised:
        await client_for(openai).generate(request())
    assert (raised.value.transient, raised.value.retry_after) == (True, 7.0)


async def test_a_moderation_block_is_a_content_refusal_not_refunded(openai):
    openai.refused_words.add("gore")
    with pytest.raises(ContentRefused) as raised:
        await client_for(openai).generate(GenerationRequest("openai/gpt-image-1", "gore everywhere", 1024, 1024))
    error = raised.value
    assert (error.status, error.code, error.kind, error.refundable) == (400, "moderation_blocked", FailureKind.USER, False)
    assert "safety system" in error.reason


async def test_an_invalid_parameter_is_the_requests_fault(openai):
    with pytest.raises(ProviderError) as raised:
        await client_for(openai).generate(request(width=640, height=640))
    assert (raised.value.status, raised.value.kind) == (400, FailureKind.USER)
    assert "Invalid size" in raised.value.reason


@pytest.mark.parametrize(("status", "kind"), [(500, FailureKind.TRANSIENT), (503, FailureKind.TRANSIENT),
                                              (401, FailureKind.SERVER), (404, FailureKind.SERVER)])  # fmt: skip
async def test_statuses_follow_the_one_classification(openai, status, kind):
    openai.fail_next(status=status)
    with pytest.raises(ProviderError) as raised:
        await client_for(openai).generate(request())
    assert raised.value.kind is kind


async def test_a_wrong_key_is_refunded_and_not_retried(openai):
    with pytest.raises(ProviderAccountUnusable) as raised:
        await client_for(openai, api_key="sk-wrong").generate(request())
    assert (raised.value.status, raised.value.transient) == (401, False)


async def test_no_key_means_no_call(openai):
    with pytest.raises(ProviderNotConfigured, match="OPENAI_API_KEY is not set"):
        await client_for(openai, api_key=None).generate(request())
    assert openai.requests == []


async def test_a_slow_answer_times_out_as_transient(openai):
    openai.delay_seconds = 2
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await client_for(openai, timeout=0.2).generate(request())


async def test_gpt_image_1_inpaints_with_the_mask_in_a_multipart_edit(openai):
    source, mask = png_of_size(1024, 1024), _transparent_png(1024, 1024)  # OpenAI reads the mask's alpha
    edit = EditInstructions(EditOperation.INPAINT, ImageInput(source), mask=mask)
    result = await client_for(openai).generate(request("openai/gpt-image-1", edit=edit))

    [fields] = openai.multipart_fields
    assert (fields["image"], fields["mask"]) == (source, mask)
    assert (fields["model"], fields["n"], fields["size"], fields["quality"]) == ("gpt-image-1", "1", "1024x1024", "medium")
    assert PROMPT in fields["prompt"]
    assert len(openai.requests_to(EDITS_PATH)) == 1
    assert pixels(result.images[0].data) == (1024, 1024)
    assert result.cost_microdollars == 50 * 5 + 323 * 10 + 1056 * 40  # the source image's input tokens count


async def test_remove_background_asks_for_transparency(openai):
    edit = EditInstructions(EditOperation.REMOVE_BACKGROUND, ImageInput(png_of_size(1024, 1024)))
    await client_for(openai).generate(request("openai/gpt-image-1", edit=edit))
    assert openai.multipart_fields[0]["background"] == "transparent"
    assert "mask" not in openai.multipart_fields[0]


async def test_outpaint_sends_a_padded_canvas_and_its_mask(openai):
    edit = EditInstructions(EditOperation.OUTPAINT, ImageInput(png_of_size(512, 512)))
    await client_for(openai).generate(request("openai/gpt-image-1", 1536, 1024, edit=edit))
    fields = openai.multipart_fields[0]
    assert pixels(fields["image"]) == pixels(fields["mask"]) == (1536, 1024)
    with Image.open(io.BytesIO(fields["mask"])) as mask:
        assert mask.getpixel((0, 0))[3] == 0  # the border is to be painted
        assert mask.getpixel((768, 512))[3] == 255  # the middle is kept


async def test_a_multi_turn_edit_sends_the_previous_result(openai):
    first, second = png_of_size(1024, 1024, (1, 2, 3)), png_of_size(1024, 1024, (4, 5, 6))
    history = (EditTurn("make it darker", ImageInput(second), source=ImageInput(first)),)
    edit = EditInstructions(EditOperation.RESTYLE, ImageInput(second), history=history)
    await client_for(openai).generate(request("openai/gpt-image-1", edit=edit))
    assert openai.multipart_fields[0]["image"] == second


async def test_dall_e_2_variations_use_their_own_endpoint(openai):
    edit = EditInstructions(EditOperation.VARIATION, ImageInput(png_of_size(512, 512)))
    result = await client_for(openai).generate(request("openai/dall-e-2", 512, 512, count=2, edit=edit))
    assert len(openai.requests_to(VARIATIONS_PATH)) == 1
    assert "prompt" not in openai.multipart_fields[0]
    assert len(result.images) == 2


async def test_dall_e_2_edits_refuse_a_source_that_is_not_square(openai):
    edit = EditInstructions(EditOperation.INPAINT, ImageInput(png_of_size(300, 200)))
    with pytest.raises(ProviderError, match="square") as raised:
        await client_for(openai).generate(request("openai/dall-e-2", 512, 512, edit=edit))
    assert raised.value.kind is FailureKind.USER
    assert openai.requests == []


async def test_the_key_never_reaches_logs_or_reprs(openai, caplog):
    caplog.set_level(logging.DEBUG)
    openai.fail_next(status=503)
    client = client_for(openai)
    with pytest.raises(ProviderError) as raised:
        await client.generate(request())
    assert KEY not in str(raised.value) and KEY not in repr(client)
    assert caplog.records
    for record in caplog.records:
        assert KEY not in str(record.__dict__)


async def _ignore(preview) -> None:
    return None


def _transparent_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 0, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()

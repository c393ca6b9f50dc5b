"""GeminiClient against a fake Gemini API over real HTTP on loopback."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from services.image.catalog import EditOperation
from services.image.providers import (
    ContentRefused,
    EditInstructions,
    EditTurn,
    FailureKind,
    GeminiClient,
    GenerationRequest,
    ImageInput,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
)
from tests.fakes.gemini import FakeGemini
from tests.fakes.image_api import png_of_size

pytestmark = pytest.mark.timeout(30)

KEY = "AIza-test-gemini-9090"
PROMPT = "A matron's portrait, stern, in sepia"
MODEL = "google/gemini-2.5-flash-image"


@pytest.fixture
async def gemini():
    async with FakeGemini(api_key=KEY) as fake:
        yield fake


def client_for(fake: FakeGemini, api_key: str | None = KEY) -> GeminiClient:
    return GeminiClient(api_key, fake.api_base_url)


def request(width: int = 1024, height: int = 1024, **fields) -> GenerationRequest:
    return GenerationRequest(model=MODEL, prompt=PROMPT, width=width, height=height, **fields)


async def test_generates_with_the_documented_request_and_reads_inline_data(gemini):
    result = await client_for(gemini).generate(request(1344, 768))

    [call] = gemini.generate_requests()
    assert call.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert call.headers["x-goog-api-key"] == KEY
    assert "Authorization" not in call.headers
    assert call.json() == {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
    }
    [image] = result.images
    with Image.open(io.BytesIO(image.data)) as opened:
        assert opened.size == (image.width, image.height) == (1344, 768)
    assert result.provider == "gemini"
    assert result.notes == ("Here is the picture you asked for.",)
    # 12 prompt tokens at $0.30/M + 1290 image tokens at $30/M + 9 text tokens at $2.50/M.
    assert result.cost_microdollars == round(12 * 0.30 + 1290 * 30 + 9 * 2.5)


@pytest.mark.parametrize(("size", "ratio"), [((832, 1248), "2:3"), ((1152, 896), "5:4"), ((1536, 672), "21:9"),
                                             ((768, 1344), "9:16"), ((896, 1152), "4:5")])  # fmt: skip
async def test_each_catalog_size_is_asked_for_by_its_aspect_ratio(gemini, size, ratio):
    result = await client_for(gemini).generate(request(*size))
    assert gemini.generate_requests()[0].json()["generationConfig"]["imageConfig"]["aspectRatio"] == ratio
    assert (result.images[0].width, result.images[0].height) == size


@pytest.mark.parametrize("refusal", ["blocked", "image_safety", "text_only"])
async def test_a_200_without_a_picture_is_a_content_refusal(gemini, refusal):
    gemini.refusals.append(refusal)
    with pytest.raises(ContentRefused) as raised:
        await client_for(gemini).generate(request())
    assert (raised.value.kind, raised.value.refundable) == (FailureKind.USER, False)
    if refusal == "text_only":
        assert "I can't make that picture" in raised.value.reason


async def test_a_per_minute_quota_is_transient_with_googles_retry_delay(gemini):
    gemini.quota_next("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", retry_delay="47s")
    with pytest.raises(ProviderUnavailable) as raised:
        await client_for(gemini).generate(request())
    assert (raised.value.status, raised.value.retry_after) == (429, 47.0)


@pytest.mark.parametrize(("quota_id", "value"), [("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "100"),
                                                 ("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "0")])  # fmt: skip
async def test_a_daily_or_zero_quota_is_not_worth_a_short_retry(gemini, quota_id, value):
    gemini.quota_next(quota_id, retry_delay="30s", quota_value=value)
    with pytest.raises(ProviderAccountUnusable) as raised:
        await client_for(gemini).generate(request())
    assert (raised.value.transient, raised.value.refundable) == (False, True)


async def test_a_bad_key_is_the_account_even_though_gemini_says_400(gemini):
    with pytest.raises(ProviderAccountUnusable) as raised:
        await client_for(gemini, api_key="AIza-wrong").generate(request())
    assert raised.value.status == 400
    assert "API key not valid" in raised.value.reason


async def test_server_errors_are_transient_and_missing_key_makes_no_call(gemini):
    gemini.fail_next(status=503, body={"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})
    with pytest.raises(ProviderUnavailable):
        await client_for(gemini).generate(request())
    gemini.requests.clear()
    with pytest.raises(ProviderNotConfigured, match="GEMINI_API_KEY"):
        await client_for(gemini, api_key=None).generate(request())
    assert gemini.requests == []


async def test_an_unknown_model_is_ours_to_fix(gemini):
    with pytest.raises(ProviderError) as raised:
        await client_for(gemini).generate(GenerationRequest("google/imagen-9", PROMPT, 1024, 1024))
    assert (raised.value.status, raised.value.kind) == (404, FailureKind.SERVER)


async def test_a_multi_turn_edit_sends_the_earlier_turns_as_contents(gemini):
    original, first_result = png_of_size(1024, 1024, (1, 1, 1)), png_of_size(1024, 1024, (2, 2, 2))
    history = (EditTurn("make the walls green", ImageInput(first_result), source=ImageInput(original)),)
    edit = EditInstructions(EditOperation.RESTYLE, ImageInput(first_result), history=history)

    result = await client_for(gemini).generate(request(edit=edit))

    contents = gemini.generate_requests()[0].json()["contents"]
    assert [content["role"] for content in contents] == ["user", "model", "user"]
    assert contents[0]["parts"][0] == {"text": "make the walls green"}
    assert base64.b64decode(contents[0]["parts"][1]["inlineData"]["data"]) == original
    assert base64.b64decode(contents[1]["parts"][0]["inlineData"]["data"]) == first_result
    # The source is the model's own last picture: it is not sent a second time.
    assert len(contents[2]["parts"]) == 1 and PROMPT in contents[2]["parts"][0]["text"]
    assert len(result.images) == 1


async def test_an_inpaint_sends_the_source_and_the_mask(gemini):
    source, mask = png_of_size(1024, 1024), png_of_size(1024, 1024, (0, 0, 0))
    edit = EditInstructions(EditOperation.INPAINT, ImageInput(source), mask=mask)
    await client_for(gemini).generate(request(edit=edit))
    [content] = gemini.generate_requests()[0].json()["contents"]
    sent = [base64.b64decode(part["inlineData"]["data"]) for part in content["parts"] if "inlineData" in part]
    assert sent == [source, mask]

"""StabilityClient against a fake Stability v1 API over real HTTP on loopback."""

from __future__ import annotations

import pytest

from services.image.providers import (
    ContentRefused,
    FailureKind,
    GenerationRequest,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
    StabilityClient,
)
from tests.fakes.stability import FakeStability

pytestmark = pytest.mark.timeout(30)

KEY = "sk-stability-test-3030"
PROMPT = "An empty corridor, flickering light"


@pytest.fixture
async def stability():
    async with FakeStability(api_key=KEY) as fake:
        yield fake


def client_for(fake: FakeStability, api_key: str | None = KEY) -> StabilityClient:
    return StabilityClient(api_key, fake.api_base_url)


def request(width: int = 1024, height: int = 1024, count: int = 1) -> GenerationRequest:
    return GenerationRequest("stability/sdxl", PROMPT, width, height, count=count)


async def test_text_to_image_sends_the_documented_body_and_decodes_the_artifacts(stability):
    result = await client_for(stability).generate(request(1344, 768, count=3))

    [call] = stability.generation_requests()
    assert call.path == "/v1/generation/stable-diffusion-xl-1024-v1-0/text-to-image"
    assert (call.headers["Authorization"], call.headers["Accept"]) == (f"Bearer {KEY}", "application/json")
    assert call.json() == {
        "text_prompts": [{"text": PROMPT, "weight": 1}], "width": 1344, "height": 768, "samples": 3,
        "steps": 30, "cfg_scale": 7,
    }  # fmt: skip
    assert [(image.width, image.height) for image in result.images] == [(1344, 768)] * 3
    assert (result.provider, result.cost_microdollars, result.refused_count) == ("stability", 3 * 2_000, 0)


async def test_filtered_artifacts_are_withheld_and_the_others_delivered(stability):
    stability.filtered = {1}
    result = await client_for(stability).generate(request(count=3))
    assert (len(result.images), result.refused_count) == (2, 1)
    assert "safety filter" in result.refused_reason


async def test_every_artifact_filtered_is_a_content_refusal(stability):
    stability.filtered = {0, 1}
    with pytest.raises(ContentRefused):
        await client_for(stability).generate(request(count=2))


async def test_filtered_words_are_a_content_refusal(stability):
    stability.filtered_words.add("corridor")
    with pytest.raises(ContentRefused, match="filtered words") as raised:
        await client_for(stability).generate(request())
    assert raised.value.refundable is False


async def test_a_size_sdxl_does_not_take_is_the_requests_fault(stability):
    with pytest.raises(ProviderError, match="allowed dimensions") as raised:
        await client_for(stability).generate(request(1024, 576))
    assert (raised.value.status, raised.value.kind) == (400, FailureKind.USER)


async def test_errors_follow_the_one_classification(stability):
    with pytest.raises(ProviderAccountUnusable):
        await client_for(stability, api_key="sk-wrong").generate(request())
    stability.fail_next(status=500, body={"id": "x", "name": "server_error", "message": "boom"})
    with pytest.raises(ProviderUnavailable):
        await client_for(stability).generate(request())
    stability.requests.clear()
    with pytest.raises(ProviderNotConfigured, match="STABILITY_API_KEY"):
        await client_for(stability, api_key=None).generate(request())
    assert stability.requests == []

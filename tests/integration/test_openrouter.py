"""OpenRouterClient against a fake OpenRouter over real HTTP on loopback."""

from __future__ import annotations

import pytest

from services.image.catalog import EditOperation
from services.image.providers import (
    ContentRefused,
    EditInstructions,
    EditTurn,
    FailureKind,
    GenerationRequest,
    ImageInput,
    OpenRouterClient,
    ProviderAccountUnusable,
    ProviderError,
    ProviderUnavailable,
)
from tests.fakes.image_api import png_of_size
from tests.fakes.openrouter import COMPLETIONS_PATH, FakeOpenRouter

pytestmark = pytest.mark.timeout(30)

KEY = "sk-or-v1-test-7070"
PROMPT = "The night porter, half in shadow"
MODEL = "google/gemini-2.5-flash-image"


@pytest.fixture
async def openrouter():
    async with FakeOpenRouter(api_key=KEY) as fake:
        yield fake


def client_for(fake: FakeOpenRouter, api_key: str | None = KEY) -> OpenRouterClient:
    return OpenRouterClient(api_key, fake.api_base_url)


def request(width: int = 1024, height: int = 1024, **fields) -> GenerationRequest:
    return GenerationRequest(model=MODEL, prompt=PROMPT, width=width, height=height, **fields)


async def test_asks_for_image_and_text_and_decodes_the_data_url(openrouter):
    result = await client_for(openrouter).generate(request(832, 1248))

    [call] = openrouter.requests_to(COMPLETIONS_PATH)
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.json() == {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "modalities": ["image", "text"],
        "stream": False,
        "image_config": {"aspect_ratio": "2:3"},
    }
    [image] = result.images
    assert (image.width, image.height, image.content_type) == (832, 1248, "image/png")
    assert result.provider == "openrouter"
    assert result.cost_microdollars == 38_700  # usage.cost of $0.0387, exactly


async def test_a_square_picture_needs_no_image_config(openrouter):
    await client_for(openrouter).generate(request())
    assert "image_config" not in openrouter.requests_to(COMPLETIONS_PATH)[0].json()


async def test_an_error_inside_a_200_body_is_still_an_error(openrouter):
    openrouter.script.append("error_in_body")
    with pytest.raises(ProviderUnavailable) as raised:
        await client_for(openrouter).generate(request())
    assert (raised.value.status, raised.value.transient) == (502, True)
    assert "Provider returned error" in raised.value.reason


async def test_out_of_credits_is_the_account(openrouter):
    openrouter.script.append("out_of_credits")
    with pytest.raises(ProviderAccountUnusable) as raised:
        await client_for(openrouter).generate(request())
    assert (raised.value.status, raised.value.kind) == (402, FailureKind.SERVER)


async def test_a_moderation_flag_is_a_content_refusal(openrouter):
    openrouter.script.append("moderation")
    with pytest.raises(ContentRefused) as raised:
        await client_for(openrouter).generate(request())
    assert (raised.value.status, raised.value.refundable) == (403, False)
    assert "violence/graphic" in raised.value.reason


async def test_an_answer_without_an_image_is_a_refusal(openrouter):
    openrouter.script.append("no_image")
    with pytest.raises(ContentRefused, match="I can't help with that"):
        await client_for(openrouter).generate(request())


@pytest.mark.parametrize(("status", "kind"), [(408, FailureKind.TRANSIENT), (429, FailureKind.TRANSIENT),
                                              (502, FailureKind.TRANSIENT), (503, FailureKind.TRANSIENT),
                                              (400, FailureKind.USER), (401, FailureKind.SERVER)])  # fmt: skip
async def test_statuses_follow_the_documented_meanings(openrouter, status, kind):
    openrouter.fail_next(status=status, body={"error": {"code": status, "message": "scripted"}},
                         headers={"Retry-After": "2"})  # fmt: skip
    with pytest.raises(ProviderError) as raised:
        await client_for(openrouter).generate(request())
    assert raised.value.kind is kind
    if kind is FailureKind.TRANSIENT:
        assert raised.value.retry_after == 2.0


async def test_an_edit_sends_the_source_as_an_image_part_and_the_chain_as_words(openrouter):
    source = png_of_size(1024, 1024)
    history = (EditTurn("add a scar", ImageInput(source)),)
    edit = EditInstructions(EditOperation.RESTYLE, ImageInput(source), history=history)
    await client_for(openrouter).generate(request(edit=edit))
    [message] = openrouter.requests_to(COMPLETIONS_PATH)[0].json()["messages"]
    text, image = message["content"]
    assert PROMPT in text["text"] and "add a scar" in text["text"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")

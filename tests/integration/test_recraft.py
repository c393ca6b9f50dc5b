"""RecraftProvider against a fake Recraft server over real HTTP on loopback."""

from __future__ import annotations

import logging
import time

import pytest

from services.image.providers import (
    ImageDownloader,
    ProviderError,
    ProviderNotConfigured,
    RecraftProvider,
)
from tests.fakes.recraft import GENERATIONS_PATH, FakeRecraft

pytestmark = pytest.mark.timeout(30)

KEY = "rk-test-secret-4242"
PROMPT = "Portrait of a gaunt asylum patient, hollow eyes, gaslight"


@pytest.fixture
async def recraft():
    async with FakeRecraft(api_key=KEY) as fake:
        yield fake


def provider_for(fake: FakeRecraft, api_key: str | None = KEY, **options) -> RecraftProvider:
    downloader = ImageDownloader(allow_private=True)
    return RecraftProvider(api_key, fake.api_base_url, downloader=downloader, **options)


async def test_generates_with_the_documented_request_and_downloads_the_png(recraft):
    image = await provider_for(recraft).generate(prompt=PROMPT, width=1024, height=1024)

    [call] = recraft.requests_to(GENERATIONS_PATH)
    assert call.method == "POST"
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.headers["Content-Type"].startswith("application/json")
    assert call.json() == {"prompt": PROMPT, "style": "realistic_image", "model": "recraftv3", "size": "1024x1024"}
    [download] = [request for request in recraft.requests if request.path.startswith("/files/")]
    assert "Authorization" not in download.headers  # the key never travels to the image host
    assert image.content_type == "image/png"
    assert image.data.startswith(b"\x89PNG")
    assert (image.width, image.height) == (64, 64)  # what the file really is, read by Pillow


async def test_size_and_model_come_from_the_call(recraft):
    recraft.image_size = None  # render at the requested size, like the real service
    provider = provider_for(recraft)
    image = await provider.generate(prompt=PROMPT, width=1365, height=1024, model="recraft/recraftv3")
    assert (image.width, image.height) == (1365, 1024)
    await provider.generate(prompt=PROMPT, width=1024, height=1024, model="recraftv2")
    bodies = [call.json() for call in recraft.requests_to(GENERATIONS_PATH)]
    sizes_and_models = [(body["size"], body["model"]) for body in bodies]
    assert sizes_and_models == [("1365x1024", "recraftv3"), ("1024x1024", "recraftv2")]


async def test_b64_json_response_needs_no_download(recraft):
    image = await provider_for(recraft, response_format="b64_json").generate(prompt=PROMPT, width=1024, height=1024)
    assert image.data.startswith(b"\x89PNG")
    assert recraft.requests_to(GENERATIONS_PATH)[0].json()["response_format"] == "b64_json"
    assert not [request for request in recraft.requests if request.path.startswith("/files/")]


async def test_missing_key_raises_not_configured_without_any_http_call(recraft):
    for key in (None, ""):
        with pytest.raises(ProviderNotConfigured, match="RECRAFT_API_KEY is not set") as raised:
            await provider_for(recraft, api_key=key).generate(prompt=PROMPT, width=1024, height=1024)
        assert raised.value.transient is False
    assert recraft.requests == []


async def test_503_is_transient_and_the_next_call_succeeds(recraft):
    recraft.fail_next(1, status=503, message="upstream busy")
    provider = provider_for(recraft)

    with pytest.raises(ProviderError) as raised:
        await provider.generate(prompt=PROMPT, width=1024, height=1024)
    assert (raised.value.transient, raised.value.status) == (True, 503)
    assert "upstream busy" in raised.value.reason

    image = await provider.generate(prompt=PROMPT, width=1024, height=1024)
    assert image.data.startswith(b"\x89PNG")
    assert len(recraft.requests_to(GENERATIONS_PATH)) == 2


async def test_429_retry_after_is_read(recraft):
    recraft.fail_next(status=429, message="Too many requests", headers={"Retry-After": "3"})
    provider = provider_for(recraft)

    with pytest.raises(ProviderError) as raised:
        await provider.generate(prompt=PROMPT, width=1024, height=1024)
    assert (raised.value.transient, raised.value.retry_after, raised.value.status) == (True, 3.0, 429)


async def test_content_policy_400_is_permanent_with_the_providers_message(recraft):
    recraft.fail_next(status=400, code="invalid_prompt", message="Prompt violates the content policy")
    provider = provider_for(recraft)

    with pytest.raises(ProviderError) as raised:
        await provider.generate(prompt=PROMPT, width=1024, height=1024)

    assert raised.value.transient is False
    assert raised.value.status == 400
    assert "Prompt violates the content policy" in raised.value.reason
    assert len(recraft.requests_to(GENERATIONS_PATH)) == 1


async def test_long_error_bodies_are_trimmed(recraft):
    recraft.fail_next(status=422, message="bad size " * 200)
    with pytest.raises(ProviderError) as raised:
        await provider_for(recraft).generate(prompt=PROMPT, width=1, height=1)
    assert len(raised.value.reason) <= 200
    assert raised.value.transient is False


async def test_wrong_key_is_permanent(recraft):
    with pytest.raises(ProviderError) as raised:
        await provider_for(recraft, api_key="rk-wrong").generate(prompt=PROMPT, width=1024, height=1024)
    assert (raised.value.status, raised.value.transient) == (401, False)
    assert "Invalid API token" in raised.value.reason


async def test_500_with_html_body_is_transient(recraft):
    recraft.fail_next(status=500)
    with pytest.raises(ProviderError) as raised:
        await provider_for(recraft).generate(prompt=PROMPT, width=1024, height=1024)
    assert raised.value.transient is True


async def test_slow_server_times_out_as_transient(recraft):
    recraft.delay_seconds = 2
    started = time.monotonic()
    with pytest.raises(ProviderError) as raised:
        await provider_for(recraft, timeout=0.2).generate(prompt=PROMPT, width=1024, height=1024)
    assert raised.value.transient is True
    assert time.monotonic() - started < 1.5


async def test_unreachable_server_is_transient():
    fake = await FakeRecraft(api_key=KEY).start()
    await fake.stop()  # the port is now closed: connection refused
    with pytest.raises(ProviderError) as raised:
        await provider_for(fake).generate(prompt=PROMPT, width=1024, height=1024)
    assert raised.value.transient is True


async def test_a_non_image_download_is_permanent(recraft):
    recraft.image_mode = "not_image"
    with pytest.raises(ProviderError, match="not an image") as raised:
        await provider_for(recraft).generate(prompt=PROMPT, width=1024, height=1024)
    assert raised.value.transient is False


async def test_download_is_refused_when_private_addresses_are_not_allowed(recraft):
    provider = RecraftProvider(KEY, recraft.api_base_url, downloader=ImageDownloader(allow_private=False))
    with pytest.raises(ProviderError, match="private") as raised:
        await provider.generate(prompt=PROMPT, width=1024, height=1024)
    assert raised.value.transient is False
    assert not [request for request in recraft.requests if request.path.startswith("/files/")]


async def test_the_key_never_reaches_the_logs(recraft, caplog):
    caplog.set_level(logging.DEBUG)
    recraft.fail_next(status=503, message="busy")
    recraft.fail_next(status=400, message="bad prompt")
    provider = provider_for(recraft)
    for _ in range(2):
        with pytest.raises(ProviderError) as raised:
            await provider.generate(prompt=PROMPT, width=1024, height=1024)
        assert KEY not in str(raised.value)
    assert caplog.records, "failures should be logged"
    for record in caplog.records:
        assert KEY not in str(record.__dict__)


# ---------------------------------------------------------------- the jobs' interface


def job_request(count: int = 1, width: int = 1024, height: int = 1024):
    from services.image.providers import GenerationRequest

    return GenerationRequest("recraft/recraftv3", PROMPT, width, height, count=count)


async def test_a_job_asks_for_n_images_and_is_costed_by_recraft_credits(recraft):
    from services.image.providers import RecraftClient

    recraft.image_size = None
    client = RecraftClient(KEY, recraft.api_base_url, downloader=ImageDownloader(allow_private=True))

    result = await client.generate(job_request(count=4, width=1365, height=1024))

    body = recraft.requests_to(GENERATIONS_PATH)[0].json()
    assert (body["n"], body["size"], body["model"]) == (4, "1365x1024", "recraftv3")
    assert [(image.width, image.height) for image in result.images] == [(1365, 1024)] * 4
    # 40 API units an image at $1 per 1,000 units.
    assert (result.provider, result.cost_microdollars) == ("recraft", 4 * 40 * 1000)


async def test_one_image_keeps_the_documented_four_field_body(recraft):
    from services.image.providers import RecraftClient

    client = RecraftClient(KEY, recraft.api_base_url, downloader=ImageDownloader(allow_private=True))
    result = await client.generate(job_request())
    assert "n" not in recraft.requests_to(GENERATIONS_PATH)[0].json()
    assert result.cost_microdollars == 40_000

"""ProviderRouter with real clients against fake Gemini, OpenRouter and OpenAI servers that
fail and recover: vendor first, failover through OpenRouter, circuit breakers, ListModels."""

from __future__ import annotations

import pytest

from services.image.catalog import ProviderName
from services.image.providers import (
    ContentRefused,
    GeminiClient,
    GenerationRequest,
    ImageDownloader,
    InvalidRequest,
    OpenAIImagesClient,
    OpenRouterClient,
    ProviderNotConfigured,
    ProviderUnavailable,
    SketchRenderer,
)
from services.image.routing import BreakerSettings, CircuitState, ModelNotServed, ProviderRouter
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_images import FakeOpenAIImages
from tests.fakes.openrouter import FakeOpenRouter

pytestmark = pytest.mark.timeout(30)

GEMINI_MODEL = "google/gemini-2.5-flash-image"
BREAKER = BreakerSettings(failure_threshold=3, cool_down_seconds=30)
SERVICE_UNAVAILABLE = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def gemini():
    async with FakeGemini(api_key="g-key") as fake:
        yield fake


@pytest.fixture
async def openrouter():
    async with FakeOpenRouter(api_key="or-key") as fake:
        yield fake


@pytest.fixture
def clock():
    return FakeClock()


def router_for(*, gemini=None, openrouter=None, openai=None, clock=None) -> ProviderRouter:
    providers = {ProviderName.LOCAL: SketchRenderer()}
    if gemini is not None:
        providers[ProviderName.GEMINI] = GeminiClient("g-key", gemini.api_base_url)
    if openrouter is not None:
        providers[ProviderName.OPENROUTER] = OpenRouterClient("or-key", openrouter.api_base_url)
    if openai is not None:
        providers[ProviderName.OPENAI] = OpenAIImagesClient(
            "sk-key", openai.api_base_url, downloader=ImageDownloader(allow_private=True)
        )
    return ProviderRouter(providers, breaker=BREAKER, clock=clock or FakeClock())


def gemini_request(**fields) -> GenerationRequest:
    return GenerationRequest(GEMINI_MODEL, "A locked door at the end of the ward", 1024, 1024, **fields)


def served(router: ProviderRouter) -> dict[str, tuple[str, ...]]:
    return {model.spec.id: tuple(map(str, model.providers)) for model in router.served_models()}


async def test_the_vendors_own_api_serves_its_model_when_its_key_is_set(gemini, openrouter):
    router = router_for(gemini=gemini, openrouter=openrouter)
    result = await router.generate(gemini_request())
    assert result.provider == "gemini"
    assert (len(gemini.generate_requests()), len(openrouter.completion_requests())) == (1, 0)
    assert served(router)[GEMINI_MODEL] == ("gemini", "openrouter")


async def test_without_the_vendors_key_openrouter_serves_the_model(openrouter):
    router = router_for(openrouter=openrouter)
    result = await router.generate(gemini_request())
    assert result.provider == "openrouter"
    assert served(router) == {GEMINI_MODEL: ("openrouter",), "local/sketch": ("local",)}


async def test_a_request_may_name_its_provider(gemini, openrouter):
    router = router_for(gemini=gemini, openrouter=openrouter)
    result = await router.generate(gemini_request(provider=ProviderName.OPENROUTER))
    assert result.provider == "openrouter" and gemini.generate_requests() == []
    with pytest.raises(ModelNotServed) as raised:
        router.provider_for("openai/dall-e-3", ProviderName.OPENROUTER)
    assert raised.value.field == "provider"


async def test_a_failing_vendor_opens_its_circuit_and_openrouter_takes_over_until_it_recovers(
    gemini, openrouter, clock
):
    router = router_for(gemini=gemini, openrouter=openrouter, clock=clock)
    gemini.start_outage(503, SERVICE_UNAVAILABLE)

    # Below the threshold each transient failure goes back to the worker (which retries).
    for _ in range(BREAKER.failure_threshold):
        with pytest.raises(ProviderUnavailable):
            await router.generate(gemini_request())
    assert router.circuit_state(ProviderName.GEMINI) is CircuitState.OPEN
    assert len(openrouter.completion_requests()) == 0

    # Open: new calls go to OpenRouter without touching Gemini, and ListModels says so.
    calls_to_gemini = len(gemini.generate_requests())
    result = await router.generate(gemini_request())
    assert result.provider == "openrouter"
    assert len(gemini.generate_requests()) == calls_to_gemini
    assert served(router)[GEMINI_MODEL] == ("openrouter",)
    assert router.provider_for(GEMINI_MODEL) is ProviderName.OPENROUTER

    # Gemini recovers; after the cool-down it is tried again, and one success closes it.
    gemini.end_outage()
    clock.now += BREAKER.cool_down_seconds
    assert router.circuit_state(ProviderName.GEMINI) is CircuitState.HALF_OPEN
    assert served(router)[GEMINI_MODEL] == ("gemini", "openrouter")  # listed, so jobs come to try it
    result = await router.generate(gemini_request())
    assert result.provider == "gemini"
    assert router.circuit_state(ProviderName.GEMINI) is CircuitState.CLOSED


async def test_a_failed_trial_reopens_the_circuit(gemini, openrouter, clock):
    router = router_for(gemini=gemini, openrouter=openrouter, clock=clock)
    gemini.start_outage(503, SERVICE_UNAVAILABLE)
    for _ in range(BREAKER.failure_threshold):
        with pytest.raises(ProviderUnavailable):
            await router.generate(gemini_request())
    clock.now += BREAKER.cool_down_seconds
    with pytest.raises(ProviderUnavailable):
        await router.generate(gemini_request())  # the trial, still failing
    assert router.circuit_state(ProviderName.GEMINI) is CircuitState.OPEN
    assert (await router.generate(gemini_request())).provider == "openrouter"


async def test_an_exhausted_account_fails_over_within_the_same_call(gemini, openrouter):
    router = router_for(gemini=gemini, openrouter=openrouter)
    gemini.quota_next("GenerateRequestsPerDayPerProjectPerModel", quota_value="100")
    result = await router.generate(gemini_request())
    assert result.provider == "openrouter"
    # Every call would fail the same way: the circuit opens at once.
    assert router.circuit_state(ProviderName.GEMINI) is CircuitState.OPEN


async def test_refusals_of_the_request_never_open_a_circuit(gemini, openrouter):
    router = router_for(gemini=gemini, openrouter=openrouter)
    for _ in range(BREAKER.failure_threshold + 2):
        gemini.refusals.append("blocked")
        with pytest.raises(ContentRefused):
            await router.generate(gemini_request())
    assert router.circuit_state(ProviderName.GEMINI) is CircuitState.CLOSED
    assert openrouter.completion_requests() == []


async def test_a_model_whose_only_provider_is_failing_drops_out_of_list_models(clock):
    async with FakeOpenAIImages(api_key="sk-key") as openai:
        router = router_for(openai=openai, clock=clock)
        assert "openai/dall-e-3" in served(router)
        openai.start_outage(502, {"error": {"message": "bad gateway", "type": "server_error"}})
        for _ in range(BREAKER.failure_threshold):
            with pytest.raises(ProviderUnavailable):
                await router.generate(GenerationRequest("openai/dall-e-3", "a ward", 1024, 1024))
        assert served(router) == {"local/sketch": ("local",)}
        with pytest.raises(ProviderUnavailable) as raised:
            await router.generate(GenerationRequest("openai/dall-e-3", "a ward", 1024, 1024))
        assert raised.value.retry_after == BREAKER.cool_down_seconds
        with pytest.raises(ModelNotServed):
            router.provider_for("openai/dall-e-3")


async def test_only_local_sketch_is_served_with_no_keys():
    router = router_for()
    assert served(router) == {"local/sketch": ("local",)}
    with pytest.raises(ModelNotServed) as raised:
        router.provider_for("openai/gpt-image-1")
    assert raised.value.field == "model"
    with pytest.raises(ProviderNotConfigured):
        await router.generate(GenerationRequest("openai/gpt-image-1", "a ward", 1024, 1024))
    result = await router.generate(GenerationRequest("local/sketch", "a ward", 128, 128, count=2))
    assert (result.provider, len(result.images)) == ("local", 2)


@pytest.mark.parametrize(
    ("request_fields", "problem"),
    [
        ({"width": 1000}, "width"),
        ({"count": 2}, "per call"),  # gemini makes one picture a call: the worker splits the job
        ({"model": "openai/dall-e-9"}, "unknown model"),
    ],
)
async def test_requests_outside_the_catalog_are_refused_before_any_call(gemini, request_fields, problem):
    router = router_for(gemini=gemini)
    fields = {"model": GEMINI_MODEL, "prompt": "a ward", "width": 1024, "height": 1024, **request_fields}
    with pytest.raises(InvalidRequest, match=problem):
        await router.generate(GenerationRequest(**fields))
    assert gemini.requests == []

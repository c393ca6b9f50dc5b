"""Failover through real jobs: a Gemini that keeps failing transiently opens its circuit,
the next jobs are served through OpenRouter (and say so), ListModels keeps the model, and
after Gemini recovers and the cool-down passes, Gemini serves again."""

from __future__ import annotations

from casefile.image.v1 import image_service_pb2 as pb
from tests.fakes.gemini import FakeGemini
from tests.fakes.openrouter import FakeOpenRouter

from .helpers import JobsStack, eventually

GEMINI = {"model": "google/gemini-2.5-flash-image", "width": 1024, "height": 1024}
OVERLOADED = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
COOL_DOWN_SECONDS = 3


async def _providers_listed(stack: JobsStack) -> list[str]:
    models = (await stack.call("ListModels", pb.ListModelsRequest())).models
    return [list(model.providers) for model in models if model.id == GEMINI["model"]][0]


async def test_jobs_fail_over_to_openrouter_while_gemini_is_open_and_return_after_recovery(
    serve, gemini: FakeGemini
):
    async with FakeOpenRouter() as openrouter, serve(
        GEMINI_API_KEY=gemini.api_key, GEMINI_BASE_URL=gemini.api_base_url,
        OPENROUTER_API_KEY=openrouter.api_key, OPENROUTER_BASE_URL=openrouter.api_base_url,
        PROVIDER_BREAKER_FAILURES="2", PROVIDER_BREAKER_COOL_DOWN_SECONDS=str(COOL_DOWN_SECONDS),
    ) as stack:  # fmt: skip
        await stack.credits.grant("u-fo", 1000, "top-up")
        assert await _providers_listed(stack) == ["gemini", "openrouter"]
        gemini.start_outage(503, OVERLOADED)

        # Two transient failures open Gemini's circuit; the job's next retry goes to OpenRouter.
        first = await stack.create("u-fo", **GEMINI)
        job = await stack.final(first.job.job_id, "u-fo")
        assert (job.status, job.provider, job.retry_count) == (pb.JOB_STATUS_COMPLETED, "openrouter", 2)
        assert len(gemini.requests) == 2
        # Still listed, now served by OpenRouter only.
        assert await _providers_listed(stack) == ["openrouter"]

        # While it is open, a new job goes straight to OpenRouter: Gemini hears nothing.
        second = await stack.create("u-fo", **GEMINI)
        job = await stack.final(second.job.job_id, "u-fo")
        assert (job.status, job.provider, job.retry_count) == (pb.JOB_STATUS_COMPLETED, "openrouter", 0)
        assert len(gemini.requests) == 2 and len(openrouter.completion_requests()) == 2

        # Gemini recovers; after the cool-down it is tried again, and its success closes the circuit.
        gemini.end_outage()
        await eventually(lambda: _gemini_first(stack), timeout=COOL_DOWN_SECONDS + 5, what="gemini listed again")
        third = await stack.create("u-fo", **GEMINI)
        job = await stack.final(third.job.job_id, "u-fo")
        assert (job.status, job.provider, job.retry_count) == (pb.JOB_STATUS_COMPLETED, "gemini", 0)
        assert len(gemini.requests) == 3 and len(openrouter.completion_requests()) == 2
        assert await _providers_listed(stack) == ["gemini", "openrouter"]


async def _gemini_first(stack: JobsStack) -> bool:
    return (await _providers_listed(stack))[:1] == ["gemini"]

"""What the generation jobs tell Prometheus, read from the endpoint an operator scrapes.

The image service runs in this process (build()), so its metrics are this process's
registry; each test compares a scrape after the work with one taken before it, since
other tests of the same worker process count into the same counters."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from casefile.image.v1 import image_service_pb2 as pb
from shared.metrics import serve_metrics
from tests.fakes.openai_images import FakeOpenAIImages, openai_error
from tests.scrape import Scrape, scrape

from .helpers import JobsStack, job_request

DALL_E_2 = {"model": "openai/dall-e-2", "width": 256, "height": 256}  # 200 per image


@pytest.fixture
async def metrics_url() -> AsyncIterator[str]:
    endpoint = serve_metrics("127.0.0.1:0")
    try:
        yield endpoint.url
    finally:
        endpoint.stop()


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def test_a_completed_job_is_counted_created_finished_and_timed_step_by_step(stack: JobsStack, metrics_url: str):
    before = await scrape(metrics_url)

    request_id = uuid.uuid4().hex
    created = await stack.create("u1", num_images=2, request_id=request_id)
    await stack.create("u1", num_images=2, request_id=request_id)
    job = await stack.final(created.job.job_id)
    await stack.settled(job.job_id)
    after = await scrape(metrics_url)

    assert job.status == pb.JOB_STATUS_COMPLETED
    assert grew(before, after, "casefile_jobs_created_total", outcome="created") == 1
    assert grew(before, after, "casefile_jobs_created_total", outcome="replayed") == 1
    assert grew(before, after, "casefile_jobs_finished_total", outcome="COMPLETED") == 1
    assert grew(before, after, "casefile_job_deliveries_total", outcome="COMPLETED") == 1
    assert grew(before, after, "casefile_job_step_seconds_count", step="generate", outcome="ok") >= 1
    assert grew(before, after, "casefile_job_step_seconds_count", step="upload", outcome="ok") == 2
    assert grew(before, after, "casefile_job_refunds_total") == 0


async def test_a_refusal_is_counted_by_its_reason(stack: JobsStack, metrics_url: str):
    before = await scrape(metrics_url)

    # local/sketch costs 100 an image; the welcome grant is 1,000.
    await stack.create("u-poor", num_images=4)
    await stack.create("u-poor", num_images=4)
    await stack.create("u-poor", num_images=2)
    details = await stack.refused("CreateGenerationJob", job_request("u-poor", num_images=1))
    after = await scrape(metrics_url)

    assert details.reason == "INSUFFICIENT_CREDITS"
    assert grew(before, after, "casefile_jobs_created_total", outcome="InsufficientCredits") == 1
    assert grew(before, after, "casefile_jobs_created_total", outcome="created") == 3


async def test_a_failed_job_counts_its_refund_and_the_units_given_back(
    openai_stack: JobsStack, openai: FakeOpenAIImages, metrics_url: str
):
    openai.start_outage(500, openai_error("the server had an error", type_="server_error"))
    before = await scrape(metrics_url)

    created = await openai_stack.create("u1", num_images=2, **DALL_E_2)
    job = await openai_stack.final(created.job.job_id)
    await openai_stack.settled(job.job_id)
    after = await scrape(metrics_url)

    assert job.status == pb.JOB_STATUS_FAILED
    assert grew(before, after, "casefile_jobs_finished_total", outcome="FAILED") == 1
    assert grew(before, after, "casefile_job_deliveries_total", outcome="PROVIDER_RETRY") == 3
    assert grew(before, after, "casefile_job_refunds_total", kind="image") == 2
    assert grew(before, after, "casefile_job_refunded_units_total", kind="image") == 400
    assert grew(before, after, "casefile_job_step_seconds_count", step="generate", outcome="error") == 4


async def test_a_cancelled_job_is_counted_once(openai_stack: JobsStack, openai: FakeOpenAIImages, metrics_url: str):
    openai.delay_seconds = 5
    before = await scrape(metrics_url)

    created = await openai_stack.create("u1", **DALL_E_2)
    request = pb.CancelGenerationJobRequest(job_id=created.job.job_id, user_id="u1")
    await openai_stack.call("CancelGenerationJob", request)
    await openai_stack.refused("CancelGenerationJob", request)
    after = await scrape(metrics_url)

    assert grew(before, after, "casefile_jobs_cancelled_total") == 1

"""RecordGeneration and GetUsage: counts, per-model images, credits net of refunds; once per job."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb

from .helpers import count_rows


def generation(job_id: str, *, model: str = "local/sketch", requested: int = 2, delivered: int = 2,
               bytes_stored: int = 1000, user_id: str = "u") -> pb.RecordGenerationRequest:
    return pb.RecordGenerationRequest(
        user_id=user_id, job_id=job_id, model=model, images_requested=requested, images_delivered=delivered,
        bytes_stored=bytes_stored, request_id=f"record:{job_id}",
    )


async def record(credits, request: pb.RecordGenerationRequest) -> pb.Usage:
    return (await credits.call("RecordGeneration", request, "image")).usage


async def get_usage(credits, user_id: str = "u") -> pb.Usage:
    return (await credits.call("GetUsage", pb.GetUsageRequest(user_id=user_id), "gateway")).usage


async def test_usage_counts_jobs_images_credits_and_storage(credits, db):
    charge = await credits.charge("u", 800, "job-1-charge")
    await credits.charge("u", 200, "job-2-charge")
    await credits.refund(charge.charge_id, 300, "job-1-refund")
    await credits.call("ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=4096, request_id="s-1"), "image")

    await record(credits, generation("job-1", model="openai/dall-e-3", requested=4, delivered=1, bytes_stored=3000))
    await record(credits, generation("job-2", model="local/sketch", requested=1, delivered=0, bytes_stored=0))
    last = await record(credits, generation("job-3", model="openai/dall-e-3", requested=2, delivered=2))

    expected = pb.Usage(
        user_id="u", generations_count=3, generations_success=2, generations_failed=1, credits_used=700,
        model_usage={"openai/dall-e-3": 3, "local/sketch": 0}, storage_used_bytes=4096, bytes_generated=4000,
    )
    assert last == expected
    assert await get_usage(credits) == expected


async def test_a_second_record_of_a_job_changes_nothing_and_returns_the_first_usage(credits, db):
    first = await record(credits, generation("job-1"))
    await record(credits, generation("job-2"))
    rows_before = await count_rows(db)

    replay, trailers = await credits.call_with_trailers("RecordGeneration", generation("job-1"), "image")

    assert replay.usage == first
    assert first.generations_count == 1
    assert trailers.get("idempotent-replayed") == "true"
    assert (await get_usage(credits)).generations_count == 2
    assert await count_rows(db) == rows_before


async def test_concurrent_records_of_one_job_count_it_once(credits, db):
    answers = await asyncio.gather(*(record(credits, generation("job-1")) for _ in range(15)))

    assert {answer.generations_count for answer in answers} == {1}
    assert (await get_usage(credits)).model_usage == {"local/sketch": 2}


async def test_a_job_recorded_with_other_figures_is_invalid_argument_naming_job_id(credits, db):
    await record(credits, generation("job-1", delivered=2))
    rows_before = await count_rows(db)

    details = await credits.refused("RecordGeneration", generation("job-1", delivered=1), "image")

    assert (details.code, details.fields, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, ("job_id",), "JOB_ID_REUSED"
    )
    assert await count_rows(db) == rows_before


async def test_usage_of_a_new_user_is_all_zero(credits):
    usage = await get_usage(credits, "nobody-yet")

    assert usage == pb.Usage(user_id="nobody-yet")


@pytest.mark.parametrize(
    ("overrides", "fields"),
    [
        ({"job_id": ""}, ("job_id",)),
        ({"model": ""}, ("model",)),
        ({"model": "local/\x00"}, ("model",)),
        ({"requested": 0, "delivered": 0}, ("images_requested",)),
        ({"requested": 101, "delivered": 1}, ("images_requested",)),
        ({"requested": 2, "delivered": 3}, ("images_delivered",)),
        ({"delivered": -1}, ("images_delivered",)),
        ({"bytes_stored": -1}, ("bytes_stored",)),
        ({"bytes_stored": 2**63 - 1}, ("bytes_stored",)),
        ({"user_id": ""}, ("user_id",)),
    ],
)
async def test_bad_generation_is_invalid_argument_and_writes_nothing(credits, db, overrides, fields):
    job_id = overrides.pop("job_id", "job-1")

    details = await credits.refused("RecordGeneration", generation(job_id, **overrides), "image")

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, fields)
    assert sum((await count_rows(db)).values()) == 0

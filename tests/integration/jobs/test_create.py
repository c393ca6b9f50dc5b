"""CreateGenerationJob's rules: validation before any call, one charge per request, refusals
that leave nothing behind, and the outages of credits and NATS."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as credits_pb
from casefile.image.v1 import image_service_pb2 as pb

from services.image.catalog import ProviderName
from services.image.jobs import storage
from services.image.jobs.domain import (
    JobRequest,
    charge_request_id,
    check_request,
    checked_row,
    job_id_for,
    job_reference,
)
from services.image.providers import SketchRenderer
from services.image.routing import ProviderRouter

from .helpers import JobsStack, charges_of, eventually, job_request, job_rows

ONE_GIB = 1073741824


async def _nothing_written(stack: JobsStack, user_id: str) -> None:
    assert await job_rows(stack.db, user_id) == []
    assert await charges_of(stack.db, user_id) == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"prompt": "nul\x00byte"}, "prompt"),
        ({"model": "acme/nothing"}, "model"),
        ({"model": ""}, "model"),
        ({"model": "openai/dall-e-3", "width": 1024, "height": 1024}, "model"),  # no OpenAI key: not served
        ({"width": 63}, "width"),
        ({"width": 2049}, "width"),
        ({"height": 0}, "height"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 11}, "num_images"),
        ({"quality": pb.QUALITY_HD}, "quality"),
        ({"quality": 77}, "quality"),
        ({"kind": pb.JOB_KIND_EDIT}, "edit_operation"),
        ({"kind": pb.JOB_KIND_EDIT}, "source_image_id"),
        ({"kind": pb.JOB_KIND_EDIT, "edit_operation": 42}, "edit_operation"),
        ({"kind": pb.JOB_KIND_EDIT, "source_image_id": "not-a-uuid"}, "source_image_id"),
        ({"kind": pb.JOB_KIND_EDIT, "edit_operation": pb.EDIT_OPERATION_RESTYLE, "mask": b"\x89PNG"}, "mask"),
        ({"kind": pb.JOB_KIND_EDIT, "edit_operation": pb.EDIT_OPERATION_INPAINT, "mask": b"GIF89a"}, "mask"),
        ({"kind": pb.JOB_KIND_EDIT, "edit_operation": pb.EDIT_OPERATION_INPAINT, "mask": b"\x89PNG\r\n\x1a\n" * 600_000},
         "mask"),
        ({"kind": pb.JOB_KIND_EDIT, "edit_operation": pb.EDIT_OPERATION_INPAINT, "model": "recraft/recraftv3",
          "width": 1024, "height": 1024, "source_image_id": str(uuid.uuid4())}, "edit_operation"),  # Recraft cannot edit
        ({"edit_operation": pb.EDIT_OPERATION_INPAINT}, "edit_operation"),
        ({"canvas_id": "c\x00"}, "canvas_id"),
        ({"canvas_id": "c" * 129}, "canvas_id"),
        ({"kind": 9}, "kind"),
        ({"source_image_id": str(uuid.uuid4())}, "source_image_id"),
        ({"mask": b"\x89PNG"}, "mask"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": " r1"}, "request_id"),
        ({"project_id": "p\n1"}, "project_id"),
        ({"parent_job_id": "not-a-uuid"}, "parent_job_id"),
    ],
)
async def test_a_bad_field_is_named_and_nothing_is_written(stack: JobsStack, fields, field):
    details = await stack.refused("CreateGenerationJob", job_request("u-bad", **fields))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details.fields, details
    await _nothing_written(stack, "u-bad")


async def test_a_bad_user_id_is_named(stack: JobsStack):
    details = await stack.refused("CreateGenerationJob", job_request("u\x07"))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields == ("user_id",)


@pytest.mark.parametrize(
    ("size", "images", "price"), [((1024, 1024), 1, 100), ((1025, 1024), 1, 150), ((2048, 2048), 3, 450), ((64, 64), 10, 1000)]
)
async def test_the_price_is_per_image_above_a_megapixel_half_again(stack: JobsStack, size, images, price):
    created = await stack.create("u-price", width=size[0], height=size[1], num_images=images)
    assert created.credits_used == price == created.job.credits_charged
    assert created.credits_remaining == 1000 - price


async def test_a_repeat_returns_the_same_job_and_charges_nothing(stack: JobsStack):
    request = job_request("u1", request_id="r-repeat")
    first = await stack.call("CreateGenerationJob", request)
    call = stack.image.CreateGenerationJob(request, metadata=stack.as_gateway)
    second = await call

    assert second.job.job_id == first.job.job_id
    assert (second.credits_used, second.credits_remaining) == (first.credits_used, first.credits_remaining)
    assert ("idempotent-replayed", "true") in tuple(await call.trailing_metadata())
    assert len(await charges_of(stack.db, "u1")) == 1
    assert await stack.balance("u1") == 900


async def test_twenty_repeats_at_once_charge_once_and_return_one_job(stack: JobsStack):
    request = job_request("u1", request_id="r-burst", num_images=3)
    answers = await asyncio.gather(*(stack.call("CreateGenerationJob", request) for _ in range(20)))

    assert len({answer.job.job_id for answer in answers}) == 1
    assert {answer.credits_remaining for answer in answers} == {700}
    assert len(await charges_of(stack.db, "u1")) == 1
    assert len(await job_rows(stack.db, "u1")) == 1
    assert await stack.balance("u1") == 700


async def test_a_repeat_with_other_arguments_is_refused(stack: JobsStack):
    await stack.create("u1", request_id="r-other")
    details = await stack.refused("CreateGenerationJob", job_request("u1", request_id="r-other", num_images=2))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.reason == "REQUEST_ID_REUSED"
    assert details.fields == ("request_id",)
    assert len(await charges_of(stack.db, "u1")) == 1


async def test_the_same_request_id_of_two_users_makes_two_jobs(stack: JobsStack):
    first = await stack.create("u1", request_id="shared")
    second = await stack.create("u2", request_id="shared")
    assert first.job.job_id != second.job.job_id
    assert await stack.balance("u1") == await stack.balance("u2") == 900


async def test_a_short_balance_is_refused_with_no_job(stack: JobsStack):
    details = await stack.refused("CreateGenerationJob", job_request("u-poor", num_images=10, width=2048, height=2048))

    assert details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "INSUFFICIENT_CREDITS"
    assert details.metadata["balance"] == "1000" and details.metadata["cost"] == "1500"
    assert await stack.balance("u-poor") == 1000
    listed = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(user_id="u-poor"))
    assert list(listed.jobs) == []
    assert await stack.db.fetchval("SELECT count(*) FROM image.job_outbox") == 0


async def test_a_refused_request_may_be_repeated_after_a_top_up(stack: JobsStack):
    request = job_request("u-later", request_id="r-later", num_images=10, width=2048, height=2048)
    await stack.refused("CreateGenerationJob", request)
    await stack.credits.grant("u-later", 1000, "top-up-later")

    created = await stack.call("CreateGenerationJob", request)
    assert created.credits_used == 1500 and created.credits_remaining == 500


async def test_a_used_up_storage_quota_is_refused_before_any_charge(stack: JobsStack):
    await stack.credits.call("ReserveStorage", credits_pb.ReserveStorageRequest(user_id="u-full", bytes=ONE_GIB,
                                                                                  request_id="fill"))  # fmt: skip
    details = await stack.refused("CreateGenerationJob", job_request("u-full"))

    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason == "QUOTA_EXCEEDED"
    assert await stack.balance("u-full") == 1000
    await _nothing_written(stack, "u-full")


async def test_the_charge_rate_limit_reaches_the_caller_with_its_delay(serve):
    async with serve(credits_env={"CHARGE_RATE_PER_SECOND": "0.01", "CHARGE_BURST": "1"}) as stack:
        await stack.create("u-fast")
        details = await stack.refused("CreateGenerationJob", job_request("u-fast"))

        assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason == "RATE_LIMITED"
        assert details.retry_after_seconds is not None and details.retry_after_seconds > 1
        assert len(await charges_of(stack.db, "u-fast")) == 1


async def test_credits_down_is_unavailable_and_nothing_is_written(serve):
    async with serve(proxies=True) as stack:
        await stack.extra["credits_proxy"].cut()
        details = await stack.refused("CreateGenerationJob", job_request("u-down", request_id="r-down"))

        assert details.code == grpc.StatusCode.UNAVAILABLE and details.reason == "DEPENDENCY_UNAVAILABLE"
        await _nothing_written(stack, "u-down")
        await stack.extra["credits_proxy"].restore()
        # The caller repeats the request as UNAVAILABLE says; the same request goes through.
        created = await _until_answered(stack, job_request("u-down", request_id="r-down"))
        job = await stack.final(created.job.job_id, "u-down")
        assert job.status == pb.JOB_STATUS_COMPLETED and await stack.balance("u-down") == 900
        assert len(await charges_of(stack.db, "u-down")) == 1


async def test_a_charge_whose_create_never_committed_is_refunded_and_no_job_shown(stack: JobsStack):
    """What a create killed between the charge and the commit leaves (the e2e test kills a
    real process there): the intent with its held message, and the charge in the ledger."""
    job_id = job_id_for("u-crash", "r-crash")
    checked = check_request(
        JobRequest(user_id="u-crash", request_id="r-crash", prompt="a ward", model="local/sketch", width=64,
                   height=64, num_images=2),
        ProviderRouter({ProviderName.LOCAL: SketchRenderer()}),
    )  # fmt: skip
    await storage.insert_intent(stack.db, checked_row(checked), 0.5, timeout=5)
    await stack.credits.charge("u-crash", 200, charge_request_id(job_id, 1), reference=job_reference(job_id))
    assert await stack.balance("u-crash") == 800

    await eventually(lambda: _status_is(stack, job_id, "ABANDONED"), timeout=20, what="the intent abandoned")
    assert await stack.balance("u-crash") == 1000
    details = await stack.refused("GetGenerationJob", pb.GetGenerationJobRequest(job_id=str(job_id), user_id="u-crash"))
    assert details.code == grpc.StatusCode.NOT_FOUND
    listed = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(user_id="u-crash"))
    assert list(listed.jobs) == []

    # A repeat of the request charges afresh under the next attempt and creates the job.
    created = await stack.call("CreateGenerationJob", job_request("u-crash", request_id="r-crash", prompt="a ward",
                                                                  num_images=2))  # fmt: skip
    assert created.job.job_id == str(job_id) and created.credits_remaining == 800
    job = await stack.final(created.job.job_id, "u-crash")
    assert job.status == pb.JOB_STATUS_COMPLETED
    charges = await charges_of(stack.db, "u-crash")
    assert sorted(row["request_id"] for row in charges) == [charge_request_id(job_id, 1), charge_request_id(job_id, 2)]


async def test_an_intent_never_charged_costs_nothing_in_the_end(stack: JobsStack):
    job_id = job_id_for("u-never", "r-never")
    checked = check_request(
        JobRequest(user_id="u-never", request_id="r-never", prompt="a ward", model="local/sketch", width=64,
                   height=64, num_images=1),
        ProviderRouter({ProviderName.LOCAL: SketchRenderer()}),
    )  # fmt: skip
    await storage.insert_intent(stack.db, checked_row(checked), 0.5, timeout=5)

    await eventually(lambda: _status_is(stack, job_id, "ABANDONED"), timeout=20, what="the intent abandoned")
    assert await stack.balance("u-never") == 1000


async def _until_answered(stack: JobsStack, request) -> pb.CreateGenerationJobResponse:
    async def answered():
        try:
            return await stack.call("CreateGenerationJob", request)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None

    return await eventually(answered, timeout=15, what="credits reachable again")


async def test_nats_down_does_not_fail_a_create_and_the_job_runs_once_it_is_back(stack: JobsStack, nats_server):
    await stack.create("u-nats")  # the stream and consumer are declared
    nats_server.stop()
    try:
        created = await stack.create("u-nats", num_images=2)
        assert created.job.status == pb.JOB_STATUS_PENDING
        await asyncio.sleep(0)  # nothing to wait for: the job waits in the outbox
        assert (await stack.get(created.job.job_id, "u-nats")).status == pb.JOB_STATUS_PENDING
    finally:
        nats_server.start()
    job = await stack.final(created.job.job_id, "u-nats", timeout=40)
    assert job.status == pb.JOB_STATUS_COMPLETED and len(job.images) == 2


async def _status_is(stack: JobsStack, job_id: uuid.UUID, status: str) -> bool:
    return await stack.db.fetchval("SELECT status FROM image.jobs WHERE job_id = $1", job_id) == status

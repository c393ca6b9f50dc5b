"""What a worker does with provider answers: retries, refunds, partial success, quality of
what is stored; against the fake OpenAI Images API, the real credits service and S3."""

from __future__ import annotations

import uuid

from casefile.credits.v1 import credits_service_pb2 as credits_pb
from casefile.image.v1 import image_service_pb2 as pb
from tests.fakes.http_server import ScriptedFault
from tests.fakes.openai_images import GENERATIONS_PATH, SAFETY_MESSAGE, FakeOpenAIImages, openai_error

from .helpers import JobsStack, eventually

ONE_GIB = 1073741824
DALL_E_2 = {"model": "openai/dall-e-2", "width": 256, "height": 256}  # 200 per image
DALL_E_3 = {"model": "openai/dall-e-3", "width": 1024, "height": 1024}  # 500 per image, one per call


async def test_transient_errors_are_retried_and_counted(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.fail_next(2, status=503, message="overloaded")
    openai.fail_next(1, status=429, message="slow down", type_="requests", code="rate_limit_exceeded")

    created = await openai_stack.create("u1", **DALL_E_2)
    job = await openai_stack.final(created.job.job_id)

    assert job.status == pb.JOB_STATUS_COMPLETED and job.retry_count == 3
    assert len(openai.requests_to(GENERATIONS_PATH)) == 4
    assert job.credits_refunded == 0 and len(job.images) == 1


async def test_a_longer_retry_after_wins_over_the_backoff(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.fail_next(1, status=429, message="slow down", type_="requests", headers={"Retry-After": "1"})

    created = await openai_stack.create("u1", **DALL_E_2)
    job = await openai_stack.final(created.job.job_id)

    first, second = openai.requests_to(GENERATIONS_PATH)[:2]
    assert job.status == pb.JOB_STATUS_COMPLETED and job.retry_count == 1
    assert second.received_at - first.received_at >= 0.95  # the backoff alone would be 0.1 s


async def test_after_three_retries_the_job_fails_and_is_refunded_once(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.start_outage(500, openai_error("the server had an error", type_="server_error"))

    created = await openai_stack.create("u1", num_images=2, **DALL_E_2)
    job = await openai_stack.final(created.job.job_id)
    await openai_stack.settled(job.job_id)

    assert job.status == pb.JOB_STATUS_FAILED and job.retry_count == 3
    assert "gave up after 3 retries" in job.error_message
    assert len(openai.requests_to(GENERATIONS_PATH)) == 4
    assert job.credits_refunded == 400 and await openai_stack.balance("u1") == 1000
    refunds = await openai_stack.db.fetch(
        "SELECT request_id, amount FROM credits.ledger_entries WHERE user_id = 'u1' AND kind = 'REFUND' ORDER BY request_id"
    )
    assert [(row["request_id"], row["amount"]) for row in refunds] == [
        (f"job:{job.job_id}:refund:0", 200), (f"job:{job.job_id}:refund:1", 200)
    ]


async def test_a_content_refusal_is_neither_retried_nor_refunded(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.refused_words = {"gore"}

    created = await openai_stack.create("u1", prompt="gore everywhere", **DALL_E_2)
    job = await openai_stack.final(created.job.job_id)
    await openai_stack.settled(job.job_id)

    assert job.status == pb.JOB_STATUS_FAILED and job.retry_count == 0
    assert "safety system" in job.error_message
    assert len(openai.requests_to(GENERATIONS_PATH)) == 1
    assert job.credits_refunded == 0 and await openai_stack.balance("u1") == 800


async def test_an_exhausted_vendor_quota_is_permanent_and_refunded(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.out_of_quota_next(1)

    created = await openai_stack.create("u1", **DALL_E_2)
    job = await openai_stack.final(created.job.job_id)
    await openai_stack.settled(job.job_id)

    assert job.status == pb.JOB_STATUS_FAILED and job.retry_count == 0
    assert len(openai.requests_to(GENERATIONS_PATH)) == 1
    assert job.credits_refunded == 200 and await openai_stack.balance("u1") == 1000


async def test_delivered_images_are_kept_and_only_the_missing_ones_refunded(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    await openai_stack.credits.grant("u1", 10_000, "top-up-partial")
    # dall-e-3 makes one image per call: the first call answers, every later one fails.
    openai.fault_for = lambda path, body: (
        ScriptedFault(502, openai_error("bad gateway", type_="server_error"))
        if len(openai.requests_to(GENERATIONS_PATH)) > 1 else None
    )  # fmt: skip

    created = await openai_stack.create("u1", num_images=3, **DALL_E_3)
    job = await openai_stack.final(created.job.job_id)
    await openai_stack.settled(job.job_id)

    assert created.credits_used == 1500
    assert job.status == pb.JOB_STATUS_COMPLETED and len(job.images) == 1
    assert job.credits_refunded == 1000 and "2 of 3 images failed" in job.error_message
    assert await openai_stack.balance("u1") == 11_000 - 1500 + 1000
    assert len(openai.requests_to(GENERATIONS_PATH)) == 1 + 4  # the second image tried 4 times, the third never
    usage = await openai_stack.db.fetchrow("SELECT images_delivered FROM credits.generations WHERE job_id = $1", job.job_id)
    assert usage["images_delivered"] == 1


async def test_a_refusal_midway_refunds_the_images_never_asked_for(openai_stack: JobsStack, openai: FakeOpenAIImages):
    await openai_stack.credits.grant("u1", 10_000, "top-up-refused-midway")
    # dall-e-3 makes one image per call: the first answers, the second meets the safety system.
    openai.fault_for = lambda path, body: (
        ScriptedFault(400, openai_error(SAFETY_MESSAGE, type_="image_generation_user_error", code="moderation_blocked"))
        if len(openai.requests_to(GENERATIONS_PATH)) == 2 else None
    )  # fmt: skip

    created = await openai_stack.create("u1", num_images=3, **DALL_E_3)
    job = await openai_stack.final(created.job.job_id)
    await openai_stack.settled(job.job_id)

    assert job.status == pb.JOB_STATUS_COMPLETED and len(job.images) == 1
    assert len(openai.requests_to(GENERATIONS_PATH)) == 2  # the third image is never asked for
    # The refused image is the player's (not refunded); the one never asked for is refunded.
    assert job.credits_refunded == 500
    assert await openai_stack.balance("u1") == 11_000 - 1500 + 500


async def test_a_job_splits_into_the_calls_the_model_needs(openai_stack: JobsStack, openai: FakeOpenAIImages):
    await openai_stack.credits.grant("u1", 10_000, "top-up-split")

    created = await openai_stack.create("u1", num_images=3, **DALL_E_3)
    job = await openai_stack.final(created.job.job_id)

    calls = openai.requests_to(GENERATIONS_PATH)
    assert job.status == pb.JOB_STATUS_COMPLETED and len(job.images) == 3
    assert [call.json()["n"] for call in calls] == [1, 1, 1]
    assert len({image.storage_id for image in job.images}) == 3


async def test_s3_down_during_upload_delays_the_job_and_pays_the_provider_once(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    s3_proxy = openai_stack.extra["s3_proxy"]
    openai.delay_seconds = 0.3
    created = await openai_stack.create("u1", num_images=2, **DALL_E_2)
    await eventually(lambda: openai.requests_to(GENERATIONS_PATH), what="the provider call")
    await s3_proxy.cut()
    # The picture is kept, the upload fails and is retried while S3 is away.
    await eventually(lambda: _status(openai_stack, created.job.job_id, "UPLOADING"), what="UPLOADING")
    await eventually(lambda: _deliveries(openai_stack, created.job.job_id, 3), what="retried deliveries")
    await s3_proxy.restore()

    job = await openai_stack.final(created.job.job_id, timeout=40)
    await openai_stack.settled(job.job_id)
    assert job.status == pb.JOB_STATUS_COMPLETED and len(job.images) == 2
    assert len(openai.requests_to(GENERATIONS_PATH)) == 1
    account = await openai_stack.credits.account("u1")
    assert account.storage_used_bytes == sum(image.size_bytes for image in job.images)


async def test_a_picture_kept_without_its_reservation_mark_is_reserved_before_it_goes_up(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    # A process older than keep_generated's reservation mark kept pictures with
    # reserved_bytes unset; whoever resumes them marks the reservation first, as before.
    s3_proxy = openai_stack.extra["s3_proxy"]
    openai.delay_seconds = 0.3
    created = await openai_stack.create("u1", **DALL_E_2)
    job_id = uuid.UUID(created.job.job_id)
    await eventually(lambda: openai.requests_to(GENERATIONS_PATH), what="the provider call")
    await s3_proxy.cut()
    await eventually(lambda: _deliveries(openai_stack, created.job.job_id, 2), what="a retried delivery")
    marked = await openai_stack.db.fetchval(
        "SELECT reserved_bytes = size_bytes FROM image.job_images WHERE job_id = $1 AND status = 'GENERATED'", job_id
    )
    assert marked, "the keep marks the reservation it is about to ask for"
    await eventually(lambda: _unmark_while_unleased(openai_stack, job_id), what="the job between deliveries")
    await s3_proxy.restore()

    job = await openai_stack.final(created.job.job_id, timeout=40)
    await openai_stack.settled(job.job_id)
    assert job.status == pb.JOB_STATUS_COMPLETED and len(job.images) == 1
    assert len(openai.requests_to(GENERATIONS_PATH)) == 1
    reserved = await openai_stack.db.fetchval("SELECT reserved_bytes FROM image.job_images WHERE job_id = $1", job_id)
    assert reserved == job.images[0].size_bytes
    assert (await openai_stack.credits.account("u1")).storage_used_bytes == job.images[0].size_bytes


async def test_credits_down_during_the_refund_delays_it_and_pays_it_once(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    credits_proxy = openai_stack.extra["credits_proxy"]
    openai.delay_seconds = 0.3
    openai.out_of_quota_next(1)
    created = await openai_stack.create("u1", **DALL_E_2)
    await eventually(lambda: openai.requests_to(GENERATIONS_PATH), what="the provider call")
    await credits_proxy.cut()

    job = await openai_stack.final(created.job.job_id)
    assert job.status == pb.JOB_STATUS_FAILED and job.credits_refunded == 200
    await eventually(lambda: _deliveries(openai_stack, job.job_id, 3), what="settlement retried")
    assert await openai_stack.balance("u1") == 800  # owed, not yet paid
    await credits_proxy.restore()

    await openai_stack.settled(job.job_id, timeout=30)
    assert await openai_stack.balance("u1") == 1000
    refunds = await openai_stack.db.fetchval(
        "SELECT count(*) FROM credits.ledger_entries WHERE user_id = 'u1' AND kind = 'REFUND'"
    )
    assert refunds == 1


async def _unmark_while_unleased(stack: JobsStack, job_id: uuid.UUID) -> bool:
    """Clears the slots' reservation mark while no delivery holds the job: the row lock
    makes the next claim wait for it, so that delivery reads the slots unmarked."""
    cleared = await stack.db.fetchval(
        """WITH free AS (SELECT job_id FROM image.jobs WHERE job_id = $1 AND lease_owner IS NULL FOR UPDATE),
                cleared AS (UPDATE image.job_images i SET reserved_bytes = NULL FROM free
                             WHERE i.job_id = free.job_id RETURNING i.slot)
           SELECT count(*) FROM cleared""",
        job_id,
    )
    return cleared > 0


async def _status(stack: JobsStack, job_id: str, status: str) -> bool:
    return await stack.db.fetchval("SELECT status FROM image.jobs WHERE job_id = $1", uuid.UUID(job_id)) == status


async def _deliveries(stack: JobsStack, job_id: str, at_least: int) -> bool:
    return await stack.db.fetchval("SELECT deliveries FROM image.jobs WHERE job_id = $1", uuid.UUID(job_id)) >= at_least


async def test_the_storage_quota_reached_at_upload_fails_the_image_with_a_refund(stack: JobsStack):
    # The quota is not used up when the job is created (one byte is left), but the image
    # does not fit when it is stored.
    await stack.credits.call("ReserveStorage", credits_pb.ReserveStorageRequest(
        user_id="u-quota", bytes=ONE_GIB - 1, request_id="fill-almost"))  # fmt: skip
    created = await stack.create("u-quota")
    job = await stack.final(created.job.job_id, "u-quota")
    await stack.settled(job.job_id)

    assert job.status == pb.JOB_STATUS_FAILED and "storage quota is used up" in job.error_message
    # The player was charged and refunded: the message must not say nothing was charged.
    assert "nothing was charged" not in job.error_message and "refunded" in job.error_message
    assert job.credits_refunded == 100 and await stack.balance("u-quota") == 1000
    assert (await stack.credits.account("u-quota")).storage_used_bytes == ONE_GIB - 1
    listing = await stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix="users/u-quota/")
    assert listing.get("KeyCount", 0) == 0


async def test_a_job_past_its_deadline_fails_what_is_left_with_a_refund(serve):
    async with serve(proxies=True, JOB_MAX_SECONDS="3") as stack:
        await stack.extra["s3_proxy"].cut()  # the upload can never succeed
        created = await stack.create("u-late", num_images=2)
        job = await stack.final(created.job.job_id, "u-late", timeout=40)
        assert job.status == pb.JOB_STATUS_FAILED and "not finished within 3 s" in job.error_message
        assert job.credits_refunded == 200
        # Settling gives back the storage reserved for the images that never went up (and
        # removes any object that did), which waits for S3.
        await stack.extra["s3_proxy"].restore()
        await stack.settled(job.job_id, timeout=30)
        assert await stack.balance("u-late") == 1000
        assert (await stack.credits.account("u-late")).storage_used_bytes == 0

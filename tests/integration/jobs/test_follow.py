"""Reading, following, cancelling and deleting jobs and images, only ever the owner's."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from casefile.image.v1 import image_service_pb2 as pb
from shared.grpc_errors import details_of
from tests.fakes.openai_images import GENERATIONS_PATH, FakeOpenAIImages

from .helpers import FINAL, JobsStack, eventually, queue_drained

DALL_E_3 = {"model": "openai/dall-e-3", "width": 1024, "height": 1024}


async def test_only_the_owner_sees_a_job(stack: JobsStack):
    created = await stack.create("u1")
    for user in ("u2", "U1"):
        details = await stack.refused("GetGenerationJob", pb.GetGenerationJobRequest(job_id=created.job.job_id, user_id=user))
        assert details.code == grpc.StatusCode.NOT_FOUND and details.reason == "JOB_NOT_FOUND"
    for job_id in (str(uuid.uuid4()), "not-a-uuid", ""):
        details = await stack.refused("GetGenerationJob", pb.GetGenerationJobRequest(job_id=job_id, user_id="u1"))
        assert details.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert (await stack.get(created.job.job_id, "u1")).job_id == created.job.job_id


async def test_list_is_newest_first_filtered_and_paged(stack: JobsStack):
    ids = [(await stack.create("u-list", request_id=f"r{n}")).job.job_id for n in range(5)]
    await stack.create("u-other")
    for job_id in ids:
        await stack.final(job_id, "u-list")
    cancelled = await stack.create("u-list", request_id="r-pending")  # may still be PENDING...
    await stack.call("CancelGenerationJob", pb.CancelGenerationJobRequest(job_id=cancelled.job.job_id, user_id="u-list"))

    seen, token = [], ""
    while True:
        page = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(user_id="u-list", page_size=2,
                                                                                     page_token=token))  # fmt: skip
        assert len(page.jobs) <= 2
        seen += [job.job_id for job in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [cancelled.job.job_id, *reversed(ids)]
    completed = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(
        user_id="u-list", status=pb.JOB_STATUS_COMPLETED))  # fmt: skip
    assert [job.job_id for job in completed.jobs] == list(reversed(ids))
    only_cancelled = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(
        user_id="u-list", status=pb.JOB_STATUS_CANCELLED))  # fmt: skip
    assert [job.job_id for job in only_cancelled.jobs] == [cancelled.job.job_id]


async def test_list_refuses_what_is_not_its_own_page_token(stack: JobsStack):
    for _ in range(3):
        await stack.create("u-page")
    page = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(user_id="u-page", page_size=1))
    for request in (
        pb.ListGenerationJobsRequest(user_id="u-else", page_token=page.next_page_token),
        pb.ListGenerationJobsRequest(user_id="u-page", page_token=page.next_page_token, status=pb.JOB_STATUS_FAILED),
        pb.ListGenerationJobsRequest(user_id="u-page", page_token="garbage!!"),
        pb.ListGenerationJobsRequest(user_id="u-page", page_size=-1),
        pb.ListGenerationJobsRequest(user_id="u-page", status=42),
    ):
        details = await stack.refused("ListGenerationJobs", request)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields, request


async def test_watch_streams_every_status_and_ends_at_the_final_one(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.delay_seconds = 0.3
    created = await openai_stack.create("u1", model="openai/dall-e-2", width=256, height=256, num_images=2)
    stream = openai_stack.image.WatchGenerationJob(
        pb.WatchGenerationJobRequest(job_id=created.job.job_id, user_id="u1"), metadata=openai_stack.as_gateway, timeout=30
    )
    statuses = [reply.job.status async for reply in stream]

    assert statuses[-1] == pb.JOB_STATUS_COMPLETED
    order = [pb.JOB_STATUS_PENDING, pb.JOB_STATUS_PROCESSING, pb.JOB_STATUS_UPLOADING, pb.JOB_STATUS_COMPLETED]
    assert [status for status in order if status in statuses] == order[order.index(statuses[0]):]
    assert statuses == sorted(statuses)
    assert pb.JOB_STATUS_PROCESSING in statuses and pb.JOB_STATUS_UPLOADING in statuses


async def test_watch_of_a_finished_job_answers_once_and_ends(stack: JobsStack):
    created = await stack.create("u1")
    await stack.final(created.job.job_id)
    stream = stack.image.WatchGenerationJob(
        pb.WatchGenerationJobRequest(job_id=created.job.job_id, user_id="u1"), metadata=stack.as_gateway, timeout=10
    )
    replies = [reply async for reply in stream]
    assert len(replies) == 1 and replies[0].job.status == pb.JOB_STATUS_COMPLETED


async def test_watch_of_someone_elses_job_is_not_found(stack: JobsStack):
    created = await stack.create("u1")
    stream = stack.image.WatchGenerationJob(
        pb.WatchGenerationJobRequest(job_id=created.job.job_id, user_id="u2"), metadata=stack.as_gateway, timeout=10
    )
    try:
        async for _ in stream:
            raise AssertionError("a stream for another user's job")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_hundred_watchers_are_pushed_one_change_feed(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.delay_seconds = 0.5
    created = await openai_stack.create("u1", model="openai/dall-e-2", width=256, height=256)
    request = pb.WatchGenerationJobRequest(job_id=created.job.job_id, user_id="u1")

    async def watch() -> list[int]:
        stream = openai_stack.image.WatchGenerationJob(request, metadata=openai_stack.as_gateway, timeout=30)
        return [reply.job.status async for reply in stream]

    results = await asyncio.gather(*(watch() for _ in range(100)))
    assert all(statuses[-1] == pb.JOB_STATUS_COMPLETED for statuses in results)
    listeners = await openai_stack.db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'casefile-image-watch' AND datname = current_database()"
    )
    assert listeners == 1


async def test_cancel_of_a_running_job_stops_before_the_next_call_and_refunds_once(
    openai_stack: JobsStack, openai: FakeOpenAIImages, nats_server
):
    await openai_stack.credits.grant("u1", 10_000, "top-up-cancel")
    openai.delay_seconds = 1.0
    created = await openai_stack.create("u1", num_images=3, **DALL_E_3)
    await eventually(lambda: openai.requests_to(GENERATIONS_PATH), what="the first provider call")

    cancelled = (await openai_stack.call("CancelGenerationJob", pb.CancelGenerationJobRequest(
        job_id=created.job.job_id, user_id="u1"))).job  # fmt: skip
    assert cancelled.status == pb.JOB_STATUS_CANCELLED and cancelled.credits_refunded == 1500
    await openai_stack.settled(created.job.job_id)
    assert await openai_stack.balance("u1") == 11_000
    # Once the worker has let go of the job, it has made every call it ever will.
    await eventually(lambda: queue_drained(nats_server.url), timeout=15, what="the worker done with the job")
    assert len(openai.requests_to(GENERATIONS_PATH)) == 1
    job = await openai_stack.get(created.job.job_id)
    assert job.status == pb.JOB_STATUS_CANCELLED and list(job.images) == []
    details = await openai_stack.refused("CancelGenerationJob", pb.CancelGenerationJobRequest(
        job_id=created.job.job_id, user_id="u1"))  # fmt: skip
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "JOB_ALREADY_FINISHED"
    refunds = await openai_stack.db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'REFUND'")
    assert refunds == 3


async def test_cancel_of_a_finished_or_foreign_job_is_refused(stack: JobsStack):
    created = await stack.create("u1")
    job = await stack.final(created.job.job_id)
    assert job.status in FINAL
    details = await stack.refused("CancelGenerationJob", pb.CancelGenerationJobRequest(job_id=job.job_id, user_id="u1"))
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    details = await stack.refused("CancelGenerationJob", pb.CancelGenerationJobRequest(job_id=job.job_id, user_id="u2"))
    assert details.code == grpc.StatusCode.NOT_FOUND


async def test_delete_image_removes_the_object_releases_storage_once_then_not_found(stack: JobsStack):
    created = await stack.create("u1", num_images=2)
    job = await stack.final(created.job.job_id)
    await stack.settled(job.job_id)
    first, second = job.images
    used = (await stack.credits.account("u1")).storage_used_bytes
    assert used == first.size_bytes + second.size_bytes

    await stack.call("DeleteImage", pb.DeleteImageRequest(image_id=first.image_id, user_id="u1"))

    assert (await stack.credits.account("u1")).storage_used_bytes == second.size_bytes
    listing = await stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix="users/u1/")
    assert [item["Key"] for item in listing["Contents"]] == [second.storage_id]
    assert [image.image_id for image in (await stack.get(job.job_id)).images] == [second.image_id]
    details = await stack.refused("DeleteImage", pb.DeleteImageRequest(image_id=first.image_id, user_id="u1"))
    assert details.code == grpc.StatusCode.NOT_FOUND and details.reason == "IMAGE_NOT_FOUND"
    assert (await stack.credits.account("u1")).storage_used_bytes == second.size_bytes
    for request in (pb.DeleteImageRequest(image_id=second.image_id, user_id="u2"),
                    pb.DeleteImageRequest(image_id="nope", user_id="u1")):  # fmt: skip
        assert (await stack.refused("DeleteImage", request)).code in (grpc.StatusCode.NOT_FOUND,
                                                                     grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    bad_id = await stack.refused("DeleteImage", pb.DeleteImageRequest(image_id="zz", user_id="u1"))
    assert bad_id.violations == (("image_id", "must be an image_id (a UUID)"),)


async def test_image_urls_only_for_the_owner(stack: JobsStack):
    created = await stack.create("u1")
    job = await stack.final(created.job.job_id)
    image = job.images[0]
    signed = await stack.call("GetImageUrl", pb.GetImageUrlRequest(storage_id=image.storage_id, user_id="u1"))
    assert image.storage_id in signed.url and "X-Amz-Signature" in signed.url
    for user in ("u2", ""):
        details = await stack.refused("GetImageUrl", pb.GetImageUrlRequest(storage_id=image.storage_id, user_id=user))
        assert details.code == grpc.StatusCode.NOT_FOUND
    await stack.call("DeleteImage", pb.DeleteImageRequest(image_id=image.image_id, user_id="u1"))
    details = await stack.refused("GetImageUrl", pb.GetImageUrlRequest(storage_id=image.storage_id, user_id="u1"))
    assert details.code == grpc.StatusCode.NOT_FOUND


async def test_job_stats_per_user_and_per_project(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.refused_words = {"gore"}
    done = await openai_stack.create("u1", project_id="p1")
    refused = await openai_stack.create("u1", project_id="p1", model="openai/dall-e-2", width=256, height=256,
                                        prompt="gore")  # fmt: skip
    other = await openai_stack.create("u2", project_id="p1", num_images=2)
    for job_id, user in ((done.job.job_id, "u1"), (refused.job.job_id, "u1"), (other.job.job_id, "u2")):
        await openai_stack.final(job_id, user)

    stats = await openai_stack.call("GetJobStats", pb.GetJobStatsRequest(user_id="u1"))
    counts = {count.status: count.count for count in stats.counts}
    assert counts[pb.JOB_STATUS_COMPLETED] == 1 and counts[pb.JOB_STATUS_FAILED] == 1 and stats.total_jobs == 2
    assert stats.success_rate == 0.5 and stats.credits_charged == 300 and stats.credits_refunded == 0
    # A project across its users is the operator's view; the gateway names the user.
    project = await openai_stack.call("GetJobStats", pb.GetJobStatsRequest(project_id="p1"), caller="admin")
    assert project.total_jobs == 3 and project.credits_charged == 500
    assert project.average_processing_time_ms >= 0
    both = await openai_stack.call("GetJobStats", pb.GetJobStatsRequest(user_id="u2", project_id="p1"))
    assert both.total_jobs == 1 and both.success_rate == 1.0
    details = await openai_stack.refused("GetJobStats", pb.GetJobStatsRequest())
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_watchers_beyond_the_limit_are_told_to_come_back(serve, openai):
    openai.delay_seconds = 2.0
    async with serve(JOB_MAX_WATCHERS="1", OPENAI_API_KEY=openai.api_key, OPENAI_BASE_URL=openai.api_base_url) as stack:
        created = await stack.create("u1", model="openai/dall-e-2", width=256, height=256)
        request = pb.WatchGenerationJobRequest(job_id=created.job.job_id, user_id="u1")
        first = stack.image.WatchGenerationJob(request, metadata=stack.as_gateway, timeout=30)
        await first.read()  # the one watcher allowed is streaming
        second = stack.image.WatchGenerationJob(request, metadata=stack.as_gateway, timeout=30)
        try:
            await second.read()
            raise AssertionError("a second watcher beyond JOB_MAX_WATCHERS=1")
        except grpc.aio.AioRpcError as error:
            details = details_of(error)
            assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.reason == "TOO_MANY_WATCHERS"
            assert details.retry_after_seconds is not None
        last = None
        while (reply := await first.read()) is not grpc.aio.EOF:
            last = reply.job.status
        assert last == pb.JOB_STATUS_COMPLETED


async def test_a_change_nobody_announced_reaches_the_watcher_at_the_next_recheck(serve, openai):
    """Announcements leave after the commit (shared/notices.py), so one can be lost with a
    dying process; a watcher then still sees the change, within JOB_WATCH_RECHECK_SECONDS."""
    openai.delay_seconds = 3.0
    async with serve(OPENAI_API_KEY=openai.api_key, OPENAI_BASE_URL=openai.api_base_url,
                     JOB_WATCH_RECHECK_SECONDS="0.3") as stack:  # fmt: skip
        created = await stack.create("u1", model="openai/dall-e-2", width=256, height=256)
        job_id = created.job.job_id
        await eventually(lambda: stack.db.fetchval("SELECT status = 'PROCESSING' FROM image.jobs WHERE job_id = $1",
                                                   uuid.UUID(job_id)), what="job running")  # fmt: skip
        stream = stack.image.WatchGenerationJob(
            pb.WatchGenerationJobRequest(job_id=job_id, user_id="u1"), metadata=stack.as_gateway, timeout=30
        )
        first = await stream.read()
        # A change made behind the service's back: no NOTIFY goes with it.
        await stack.db.execute("UPDATE image.jobs SET update_time = update_time + interval '1 ms' WHERE job_id = $1",
                               uuid.UUID(job_id))  # fmt: skip
        second = await asyncio.wait_for(stream.read(), timeout=2.5)

        assert first.job.status == second.job.status == pb.JOB_STATUS_PROCESSING
        assert second.job.update_time.ToNanoseconds() > first.job.update_time.ToNanoseconds()
        stream.cancel()
        await stack.final(job_id)

"""Live previews (GPT Image's streamed partial images, inline in WatchGenerationJob) and
`image.job.completed` (one event per job through the outbox, also across a NATS outage)."""

from __future__ import annotations

import asyncio
import io
import uuid

import grpc
from PIL import Image

from casefile.image.v1 import image_service_pb2 as pb
from services.image.catalog import CATALOG, price_units
from tests.fakes.openai_images import GENERATIONS_PATH, FakeOpenAIImages
from tests.fakes.tcp_proxy import TcpProxy

from .helpers import JobsStack, completed_event_of, completed_events, eventually, job_rows, queue_drained

GPT = {"model": "openai/gpt-image-1", "width": 1024, "height": 1024}


def _watch(stack: JobsStack, job_id: str, user_id: str):
    return stack.image.WatchGenerationJob(
        pb.WatchGenerationJobRequest(job_id=job_id, user_id=user_id), metadata=stack.as_gateway, timeout=30
    )


async def test_previews_reach_the_watcher_while_the_picture_forms(openai_stack: JobsStack, openai: FakeOpenAIImages):
    openai.start_stream, openai.resume_stream = asyncio.Event(), asyncio.Event()
    await openai_stack.credits.grant("u-live", 1000, "top-up")  # two gpt-image-1 images cost 1200
    created = await openai_stack.create("u-live", num_images=2, partial_images=2, **GPT)
    stream = _watch(openai_stack, created.job.job_id, "u-live")
    replies = [await stream.read()]  # the current state: the watcher follows the job's previews now
    openai.start_stream.set()
    while (reply := await stream.read()) is not grpc.aio.EOF:
        replies.append(reply)
        if reply.HasField("preview") and (reply.preview.image_index, reply.preview.preview_index) == (0, 0):
            # The vendor holds the rest of its stream: this preview came before any image.
            assert (await openai_stack.get(created.job.job_id, "u-live")).status == pb.JOB_STATUS_PROCESSING
            openai.resume_stream.set()

    previews = [reply.preview for reply in replies if reply.HasField("preview")]
    assert [(p.image_index, p.preview_index) for p in previews] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for preview in previews:
        with Image.open(io.BytesIO(preview.data)) as picture:
            assert (picture.format, picture.size) == ("JPEG", (preview.width, preview.height))
        assert preview.content_type == "image/jpeg" and max(preview.width, preview.height) <= 256
    final = replies[-1].job
    assert final.status == pb.JOB_STATUS_COMPLETED and final.partial_images == 2
    assert [(image.width, image.height) for image in final.images] == [(1024, 1024)] * 2
    # The vendor was asked to stream, one image per call.
    calls = [request.json() for request in openai.api_requests(GENERATIONS_PATH)]
    assert [(call["stream"], call["partial_images"], call["n"]) for call in calls] == [(True, 2, 1)] * 2

    # Never billed as images, never stored: the price of two images, two objects, their bytes counted.
    assert created.credits_used == price_units(CATALOG.get("openai/gpt-image-1"), width=1024, height=1024, num_images=2)
    listed = await openai_stack.s3.list_objects_v2(Bucket=openai_stack.bucket, Prefix="users/u-live/")
    assert sorted(item["Key"] for item in listed["Contents"]) == sorted(image.storage_id for image in final.images)
    account = await openai_stack.credits.account("u-live")
    assert account.storage_used_bytes == sum(image.size_bytes for image in final.images)


async def test_a_job_without_partial_images_is_not_streamed(openai_stack: JobsStack, openai: FakeOpenAIImages):
    created = await openai_stack.create("u-plain", **GPT)
    replies = [reply async for reply in _watch(openai_stack, created.job.job_id, "u-plain")]
    assert not any(reply.HasField("preview") for reply in replies)
    assert replies[-1].job.status == pb.JOB_STATUS_COMPLETED
    assert "stream" not in openai.api_requests(GENERATIONS_PATH)[-1].json()


async def test_bad_partial_images_are_refused_before_any_charge(openai_stack: JobsStack):
    await openai_stack.credits.grant("u-bad", 9000, "top-up")
    for fields in ({"partial_images": 4, **GPT}, {"partial_images": -1, **GPT},
                   {"partial_images": 1, "model": "openai/dall-e-3", "width": 1024, "height": 1024}):  # fmt: skip
        details = await openai_stack.refused("CreateGenerationJob", _request("u-bad", **fields))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and list(details.fields) == [
            "partial_images"
        ], fields
    assert await openai_stack.balance("u-bad") == 10_000 and await job_rows(openai_stack.db, "u-bad") == []


def _request(user_id: str, **fields) -> pb.CreateGenerationJobRequest:
    return pb.CreateGenerationJobRequest(user_id=user_id, prompt="a ward", num_images=1, request_id=uuid.uuid4().hex,
                                         **fields)  # fmt: skip


# ---------------------------------------------------------------- image.job.completed


async def test_a_completed_job_announces_itself_once_as_committed(stack: JobsStack, nats_server):
    created = await stack.create("u-done", num_images=2)
    await stack.settled(created.job.job_id)
    event = await completed_event_of(nats_server.url, created.job.job_id)
    assert event.msg_id == f"image.job.completed:{created.job.job_id}"
    assert event.job == await stack.get(created.job.job_id, "u-done")
    assert event.job.status == pb.JOB_STATUS_COMPLETED and len(event.job.images) == 2
    await _exactly_one_event_each(stack, nats_server.url, [created.job.job_id])


async def test_a_failed_job_announces_its_refund(openai_stack: JobsStack, openai: FakeOpenAIImages, nats_server):
    openai.fail_next(10, status=500)  # more than the worker's three retries
    created = await openai_stack.create("u-fail", **GPT)
    event = await completed_event_of(nats_server.url, created.job.job_id, timeout=30)
    assert event.job.status == pb.JOB_STATUS_FAILED and not event.job.images
    assert event.job.credits_refunded == event.job.credits_charged == created.credits_used
    assert event.job.retry_count == 3 and event.job.error_message
    await _exactly_one_event_each(openai_stack, nats_server.url, [created.job.job_id])


async def test_a_cancelled_job_announces_itself_and_the_late_worker_adds_nothing(
    openai_stack: JobsStack, openai: FakeOpenAIImages, nats_server
):
    openai.start_stream = asyncio.Event()  # the vendor's call hangs until the test lets it go
    created = await openai_stack.create("u-cancel", partial_images=1, **GPT)
    await eventually(lambda: openai.api_requests(GENERATIONS_PATH), what="the provider called")
    await openai_stack.call("CancelGenerationJob", pb.CancelGenerationJobRequest(job_id=created.job.job_id,
                                                                                 user_id="u-cancel"))  # fmt: skip
    event = await completed_event_of(nats_server.url, created.job.job_id)
    assert event.job.status == pb.JOB_STATUS_CANCELLED
    assert event.job.credits_refunded == event.job.credits_charged
    openai.start_stream.set()  # the worker's image arrives after the cancel: not delivered, no second event
    await _exactly_one_event_each(openai_stack, nats_server.url, [created.job.job_id])


async def test_events_of_jobs_finished_while_nats_is_down_are_relayed_once_it_is_back(
    serve, openai: FakeOpenAIImages, nats_server
):
    async with TcpProxy("127.0.0.1", nats_server.port) as proxy:
        nats_url = f"nats://{proxy.address}"
        async with serve(OPENAI_API_KEY=openai.api_key, OPENAI_BASE_URL=openai.api_base_url, NATS_URL=nats_url) as stack:
            openai.start_stream = asyncio.Event()
            running = await stack.create("u-outage", partial_images=1, **GPT)
            cancelled = await stack.create("u-outage", model="local/sketch", width=64, height=64,
                                           request_id="to-cancel")  # fmt: skip
            await eventually(lambda: openai.api_requests(GENERATIONS_PATH), what="the provider called")
            await stack.final(cancelled.job.job_id, "u-outage")
            await proxy.cut()
            # Both reach a final status with NATS away: one finishes its call, one more is cancelled.
            late = await stack.create("u-outage", model="local/sketch", width=64, height=64, request_id="late")
            await stack.call("CancelGenerationJob", pb.CancelGenerationJobRequest(job_id=late.job.job_id,
                                                                                 user_id="u-outage"))  # fmt: skip
            openai.start_stream.set()
            assert (await stack.final(running.job.job_id, "u-outage")).status == pb.JOB_STATUS_COMPLETED
            waiting = await stack.db.fetchval(
                "SELECT count(*) FROM image.job_outbox WHERE subject = 'image.job.completed' AND published_at IS NULL")
            assert waiting == 2
            published = {event.job.job_id for event in await completed_events(nats_server.url)}
            assert not published & {running.job.job_id, late.job.job_id}

            await proxy.restore()
            for job_id in (running.job.job_id, late.job.job_id):
                await completed_event_of(nats_server.url, job_id, timeout=30)
            ids = [running.job.job_id, cancelled.job.job_id, late.job.job_id]
            await _exactly_one_event_each(stack, nats_server.url, ids)


async def _exactly_one_event_each(stack: JobsStack, nats_url: str, job_ids: list[str]) -> None:
    """Once every delivery is acknowledged (retries, redeliveries, late workers all done)."""
    await eventually(lambda: queue_drained(nats_url), timeout=30, what="every job message acknowledged")
    await eventually(lambda: _outbox_empty(stack), timeout=10, what="the outbox relayed")
    events = await completed_events(nats_url)
    for job_id in job_ids:
        assert [event.msg_id for event in events if event.job.job_id == job_id] == [f"image.job.completed:{job_id}"]


async def _outbox_empty(stack: JobsStack) -> bool:
    return not await stack.db.fetchval("SELECT count(*) FROM image.job_outbox WHERE published_at IS NULL")

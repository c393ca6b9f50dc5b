"""hypothesis against the real image server's job methods, with the real credits service:
never INTERNAL or UNKNOWN, INVALID_ARGUMENT always names a field, and (the autouse audit)
no charge without a job and no job without a charge."""

from __future__ import annotations

import io
import uuid

import pytest
from hypothesis import strategies as st
from PIL import Image

from casefile.image.v1 import image_service_pb2 as pb
from tests.integration.test_hostile_input import answer, first_of_stream, fuzz, hostile_text, int32, page_tokens

from .helpers import JobsStack, job_rows

pytestmark = pytest.mark.timeout(180)

models = st.one_of(st.sampled_from(["local/sketch", "openai/dall-e-3", "recraft/recraftv3", "acme/x"]), hostile_text)
sides = st.one_of(st.sampled_from([64, 65, 512, 1024, 2048, 2049, 0, -1]), int32)
counts = st.one_of(st.integers(min_value=0, max_value=12), int32)
enums = st.one_of(st.integers(min_value=0, max_value=6), int32)
ids = st.one_of(st.sampled_from(["u1", "u2"]), hostile_text)
request_ids = st.one_of(st.sampled_from(["r1", "r2", "r3"]), st.uuids().map(str), hostile_text)
job_ids = st.one_of(st.uuids().map(str), hostile_text)


async def test_hostile_creates_never_fail_internally_and_keep_the_money_straight(stack: JobsStack):
    for user in ("u1", "u2"):
        await stack.credits.grant(user, 1_000_000, f"fuzz-{user}")

    async def check(user_id, request_id, prompt, model, width, height, num_images, quality, kind, project_id,
                    parent_job_id, mask, partial_images):  # fmt: skip
        request = pb.CreateGenerationJobRequest(
            user_id=user_id, request_id=request_id, prompt=prompt, model=model, width=width, height=height,
            num_images=num_images, quality=quality, kind=kind, project_id=project_id, parent_job_id=parent_job_id,
            mask=mask, partial_images=partial_images,
        )  # fmt: skip
        await answer(stack.image.CreateGenerationJob(request, metadata=stack.as_gateway, timeout=20))

    await fuzz(
        check,
        user_id=ids, request_id=request_ids, prompt=st.one_of(st.just("a ward"), hostile_text), model=models,
        width=sides, height=sides, num_images=counts, quality=enums, kind=enums,
        project_id=st.one_of(st.just(""), hostile_text), parent_job_id=st.one_of(st.just(""), job_ids),
        mask=st.one_of(st.just(b""), st.binary(max_size=20)), partial_images=counts,
    )  # fmt: skip
    # Whatever was created runs to an end (the audit then compares ledger and jobs).
    for user in ("u1", "u2"):
        for row in await job_rows(stack.db, user):
            if row["status"] not in ("CHARGING", "ABANDONING", "ABANDONED"):
                await stack.final(str(row["job_id"]), user, timeout=60)
                await stack.settled(str(row["job_id"]), timeout=60)


async def test_hostile_reads_cancels_and_deletes_never_fail_internally(stack: JobsStack):
    real = (await stack.create("u1")).job.job_id

    async def check(job_id, user_id, status, page_size, page_token, project_id, canvas_id, root_job_id):
        job_id = job_id or real
        await answer(stack.image.GetGenerationJob(pb.GetGenerationJobRequest(job_id=job_id, user_id=user_id),
                                                  metadata=stack.as_gateway))  # fmt: skip
        await answer(stack.image.ListGenerationJobs(
            pb.ListGenerationJobsRequest(user_id=user_id, status=status, page_size=page_size, page_token=page_token,
                                         project_id=project_id, canvas_id=canvas_id, root_job_id=root_job_id),
            metadata=stack.as_gateway))  # fmt: skip
        await answer(stack.image.CancelGenerationJob(pb.CancelGenerationJobRequest(job_id=job_id, user_id=user_id),
                                                     metadata=stack.as_gateway))  # fmt: skip
        await answer(stack.image.DeleteImage(pb.DeleteImageRequest(image_id=job_id, user_id=user_id),
                                             metadata=stack.as_gateway))  # fmt: skip
        await answer(stack.image.GetJobStats(pb.GetJobStatsRequest(user_id=user_id, project_id=project_id),
                                             metadata=stack.as_gateway))  # fmt: skip
        await first_of_stream(stack.image.WatchGenerationJob(
            pb.WatchGenerationJobRequest(job_id=job_id, user_id=user_id), metadata=stack.as_gateway, timeout=10))  # fmt: skip

    await fuzz(
        check, job_id=st.one_of(st.just(""), job_ids), user_id=ids, status=enums, page_size=int32,
        page_token=page_tokens, project_id=st.one_of(st.just(""), hostile_text),
        canvas_id=st.one_of(st.just(""), hostile_text), root_job_id=st.one_of(st.just(""), st.just(real), job_ids),
    )  # fmt: skip
    assert uuid.UUID(real)


def _png(width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_hostile_edits_never_fail_internally_and_keep_the_money_straight(stack: JobsStack):
    """Arbitrary EDIT requests against real sources and parents of two users: every answer
    is a refusal by name, a NOT_FOUND, or a job that runs to an end (the audit follows)."""
    for user in ("u1", "u2"):
        await stack.credits.grant(user, 1_000_000, f"fuzz-edit-{user}")
    made = [await stack.final((await stack.create(user, width=64, height=80)).job.job_id, user) for user in ("u1", "u2")]
    images = [job.images[0].image_id for job in made]
    parents = [job.job_id for job in made]
    masks = st.one_of(
        st.just(b""), st.binary(max_size=64),
        st.sampled_from([_png(64, 80, "RGBA"), _png(64, 80, "RGB"), _png(80, 64, "RGBA"), _png(64, 80, "LA"),
                         _png(64, 80, "P"), _png(64, 80, "RGBA")[:100], _png(1, 1, "RGBA")]),
        st.binary(min_size=8, max_size=64).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail),
    )  # fmt: skip

    async def check(user_id, operation, source_image_id, parent_job_id, mask, model, width, height, prompt, canvas_id):
        request = pb.CreateGenerationJobRequest(
            user_id=user_id, request_id=uuid.uuid4().hex, kind=pb.JOB_KIND_EDIT, edit_operation=operation,
            source_image_id=source_image_id, parent_job_id=parent_job_id, mask=mask, model=model, width=width,
            height=height, num_images=1, prompt=prompt, canvas_id=canvas_id,
        )  # fmt: skip
        await answer(stack.image.CreateGenerationJob(request, metadata=stack.as_gateway, timeout=20))

    await fuzz(
        check,
        # Weighted towards requests that get far: a real source, a known operation, the model served here.
        user_id=st.sampled_from(["u1", "u1", "u2"]), operation=st.one_of(st.integers(1, 5), enums),
        source_image_id=st.one_of(st.sampled_from(images), st.sampled_from(["", *images]), st.uuids().map(str), hostile_text),
        parent_job_id=st.one_of(st.just(""), st.sampled_from(["", *parents]), job_ids),
        mask=st.one_of(st.just(b""), masks),
        model=st.sampled_from(["local/sketch", "local/sketch", "openai/gpt-image-1", "google/gemini-2.5-flash-image"]),
        width=st.sampled_from([64, 96, 256, 1024]), height=st.sampled_from([64, 80, 256, 1024]),
        prompt=st.one_of(st.just("in ink"), st.sampled_from(["", "in ink"]), hostile_text),
        canvas_id=st.one_of(st.just(""), hostile_text),
    )  # fmt: skip
    edits = 0
    for user in ("u1", "u2"):
        for row in await job_rows(stack.db, user):
            if row["status"] not in ("CHARGING", "ABANDONING", "ABANDONED"):
                edits += row["kind"] == "EDIT"
                await stack.final(str(row["job_id"]), user, timeout=60)
                await stack.settled(str(row["job_id"]), timeout=60)
    assert edits > 0  # some requests were good enough to run

"""The image editor's jobs on real servers: EDIT jobs with their source and mask checked
before the charge, edit chains (multi-turn to Gemini and GPT Image, at most 50 deep),
projects and canvases, and the providers' own cost in the job and its statistics."""

from __future__ import annotations

import io
import uuid
from decimal import ROUND_HALF_UP, Decimal

import grpc
import pytest
from PIL import Image

from casefile.image.v1 import image_service_pb2 as pb
from tests.fakes.gemini import FakeGemini, inline_pictures
from tests.fakes.openai_images import EDITS_PATH, FakeOpenAIImages
from tests.fakes.recraft import FakeRecraft

from tests.polling import eventually

from .helpers import JobsStack, charges_of, job_rows

pytestmark = pytest.mark.timeout(120)


def _png(width: int, height: int, mode: str = "RGBA", colour=(0, 0, 0, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour if mode == "RGBA" else colour[:3]).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask(width: int, height: int) -> bytes:
    """Opaque, with a transparent square in the middle: repaint that square."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    image.paste((0, 0, 0, 0), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _stored(stack: JobsStack, storage_id: str) -> bytes:
    reply = await stack.s3.get_object(Bucket=stack.bucket, Key=storage_id)
    return await reply["Body"].read()


async def _image_of(stack: JobsStack, user_id: str = "u1", **fields) -> pb.Image:
    """A finished job's first image (the source of the edits below)."""
    created = await stack.create(user_id, **fields)
    job = await stack.final(created.job.job_id, user_id)
    assert job.status == pb.JOB_STATUS_COMPLETED, job.error_message
    return job.images[0]


def _edit(source_image_id: str = "", operation=pb.EDIT_OPERATION_INPAINT, **fields) -> dict:
    return {"kind": pb.JOB_KIND_EDIT, "source_image_id": source_image_id, "edit_operation": operation, **fields}


def _gemini_cost(prompt_tokens: int) -> int:
    # Google's prices: $0.30 per million input tokens, $30 per million image output tokens
    # (1290 a picture), $2.50 per million text output tokens (the fake says 9).
    total = Decimal(prompt_tokens) * Decimal("0.30") + 1290 * 30 + 9 * Decimal("2.50")
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ---------------------------------------------------------------- an edit end to end


async def test_an_inpaint_with_a_mask_runs_to_completed_and_stores_the_picture(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    await openai_stack.credits.grant("u1", 10_000, "grant-inpaint")
    source = await _image_of(openai_stack, model="openai/gpt-image-1", width=1024, height=1024, quality=pb.QUALITY_LOW)
    mask = _mask(1024, 1024)
    balance = await openai_stack.balance()

    created = await openai_stack.create(
        "u1", prompt="a cracked mirror in the ward", model="openai/gpt-image-1", width=1024, height=1024,
        quality=pb.QUALITY_LOW, project_id="p-ward", canvas_id="c-mirror", **_edit(source.image_id, mask=mask),
    )  # fmt: skip
    assert created.credits_used == 200 and await openai_stack.balance() == balance - 200
    job = await openai_stack.final(created.job.job_id)

    assert job.status == pb.JOB_STATUS_COMPLETED, job.error_message
    assert (job.kind, job.edit_operation, job.source_image_id) == (pb.JOB_KIND_EDIT, pb.EDIT_OPERATION_INPAINT,
                                                                  source.image_id)  # fmt: skip
    assert (job.project_id, job.canvas_id, job.root_job_id, job.chain_depth) == ("p-ward", "c-mirror", job.job_id, 0)
    # The provider's edit API got the stored source and the mask as they are.
    [call] = [fields for fields in openai.multipart_fields if fields.get("mask")]
    assert call["image"] == await _stored(openai_stack, source.storage_id)
    assert call["mask"] == mask and call["model"] == "gpt-image-1" and call["quality"] == "low"
    assert "a cracked mirror in the ward" in call["prompt"]
    assert len(openai.requests_to(EDITS_PATH)) == 1
    # Stored like a generated image, under the user's key.
    [image] = job.images
    assert image.storage_id == f"users/u1/jobs/{job.job_id}/0.png"
    stored = await _stored(openai_stack, image.storage_id)
    assert len(stored) == image.size_bytes and Image.open(io.BytesIO(stored)).size == (1024, 1024)
    # OpenAI's own price: 50 text tokens at $5/M, the source's 323 image tokens at $10/M,
    # 272 output tokens (low, 1024x1024) at $40/M.
    assert job.provider_cost_micros == 50 * 5 + 323 * 10 + 272 * 40


async def test_a_local_edit_of_every_operation_completes(stack: JobsStack):
    await stack.credits.grant("u1", 10_000, "grant-ops")
    source = await _image_of(stack, width=96, height=64)
    for operation in (pb.EDIT_OPERATION_INPAINT, pb.EDIT_OPERATION_OUTPAINT, pb.EDIT_OPERATION_VARIATION,
                      pb.EDIT_OPERATION_REMOVE_BACKGROUND, pb.EDIT_OPERATION_RESTYLE):  # fmt: skip
        prompt = "" if operation in (pb.EDIT_OPERATION_VARIATION, pb.EDIT_OPERATION_REMOVE_BACKGROUND) else "in ink"
        mask = _mask(96, 64) if operation == pb.EDIT_OPERATION_INPAINT else b""
        created = await stack.create("u1", prompt=prompt, width=128, height=96, **_edit(source.image_id, operation, mask=mask))
        job = await stack.final(created.job.job_id)
        assert job.status == pb.JOB_STATUS_COMPLETED, (operation, job.error_message)
        assert [(image.width, image.height) for image in job.images] == [(128, 96)]


# ---------------------------------------------------------------- refused before the charge


@pytest.mark.parametrize(
    ("mask", "problem"),
    [
        (_mask(32, 32), "size"),
        (_png(96, 64, mode="RGB"), "alpha"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, "PNG"),
        (_mask(96, 64)[:200], "readable"),  # a real PNG header, the pixels cut off
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * (4 * 1024 * 1024), "bytes"),
    ],
)
async def test_a_bad_mask_is_refused_by_name_and_charges_nothing(stack: JobsStack, mask: bytes, problem: str):
    source = await _image_of(stack, width=96, height=64)
    balance, charges, jobs = await stack.balance(), len(await charges_of(stack.db, "u1")), len(await job_rows(stack.db, "u1"))

    details = await stack.refused("CreateGenerationJob", _request(width=96, height=64, **_edit(source.image_id, mask=mask)))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields == ("mask",), details
    assert problem in details.message
    assert await stack.balance() == balance
    assert len(await charges_of(stack.db, "u1")) == charges and len(await job_rows(stack.db, "u1")) == jobs


async def test_a_source_image_that_is_not_the_users_is_not_found_and_charges_nothing(stack: JobsStack):
    theirs = await _image_of(stack, "u2")
    gone = await _image_of(stack, "u1")
    await stack.call("DeleteImage", pb.DeleteImageRequest(image_id=gone.image_id, user_id="u1"))
    balance = await stack.balance("u1")

    for image_id in (theirs.image_id, gone.image_id, str(uuid.uuid4())):
        details = await stack.refused("CreateGenerationJob", _request(**_edit(image_id, pb.EDIT_OPERATION_RESTYLE)))
        assert details.code == grpc.StatusCode.NOT_FOUND, details
        assert (details.reason, details.metadata.get("field")) == ("IMAGE_NOT_FOUND", "source_image_id")
    assert await stack.balance("u1") == balance
    assert len(await charges_of(stack.db, "u1")) == 1  # the job that made `gone`


async def test_a_parent_job_that_is_not_the_users_is_not_found_and_charges_nothing(stack: JobsStack):
    theirs = await stack.create("u2")
    for parent in (theirs.job.job_id, str(uuid.uuid4())):
        details = await stack.refused("CreateGenerationJob", _request(parent_job_id=parent))
        assert details.code == grpc.StatusCode.NOT_FOUND, details
        assert (details.reason, details.metadata.get("field")) == ("JOB_NOT_FOUND", "parent_job_id")
    assert await stack.balance("u1") == 1000 and await job_rows(stack.db, "u1") == []


async def test_a_model_that_cannot_run_the_operation_is_refused_before_the_charge(
    openai_stack: JobsStack,
):
    source = await _image_of(openai_stack, width=96, height=64)  # local/sketch, not square
    balance = await openai_stack.balance()
    cases = [
        (dict(model="openai/dall-e-3", width=1024, height=1024, **_edit(source.image_id, pb.EDIT_OPERATION_RESTYLE)),
         "edit_operation"),
        (dict(model="openai/dall-e-2", width=256, height=256, **_edit(source.image_id, pb.EDIT_OPERATION_RESTYLE)),
         "edit_operation"),
        # dall-e-2 edits square pictures only.
        (dict(model="openai/dall-e-2", width=256, height=256, **_edit(source.image_id, pb.EDIT_OPERATION_INPAINT)),
         "source_image_id"),
        # Recraft edits nothing (the catalog says so before asking who serves it).
        (dict(model="recraft/recraftv3", width=1024, height=1024, **_edit(source.image_id)), "edit_operation"),
    ]  # fmt: skip
    for fields, field in cases:
        details = await openai_stack.refused("CreateGenerationJob", _request(**fields))
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields == (field,), (fields, details)
    assert await openai_stack.balance() == balance


def _request(user_id: str = "u1", **fields) -> pb.CreateGenerationJobRequest:
    values = {"prompt": "a pale ward at night", "model": "local/sketch", "width": 64, "height": 64, "num_images": 1,
              "request_id": uuid.uuid4().hex, **fields}  # fmt: skip
    return pb.CreateGenerationJobRequest(user_id=user_id, **values)


# ---------------------------------------------------------------- chains


async def test_a_three_turn_gemini_chain_sends_the_earlier_turns_as_contents(gemini_stack: JobsStack, gemini: FakeGemini):
    stack = gemini_stack
    await stack.credits.grant("u1", 10_000, "grant-gemini")
    options = {"model": "google/gemini-2.5-flash-image", "width": 1024, "height": 1024}
    first = await stack.final((await stack.create("u1", prompt="a nurse in the corridor", **options)).job.job_id)
    second = await stack.final((await stack.create(
        "u1", prompt="as a charcoal drawing", parent_job_id=first.job_id, **_edit(operation=pb.EDIT_OPERATION_RESTYLE),
        **options)).job.job_id)  # fmt: skip
    third = await stack.final((await stack.create(
        "u1", prompt="her lantern goes out", parent_job_id=second.job_id, **_edit(operation=pb.EDIT_OPERATION_RESTYLE),
        **options)).job.job_id)  # fmt: skip
    assert [job.status for job in (first, second, third)] == [pb.JOB_STATUS_COMPLETED] * 3, third.error_message

    # The third call is a conversation: each earlier turn's prompt, then the picture it made.
    contents = gemini.generate_requests()[2].json()["contents"]
    assert [content["role"] for content in contents] == ["user", "model", "user", "model", "user"]
    assert contents[0]["parts"] == [{"text": "a nurse in the corridor"}]
    assert inline_pictures(contents[1]) == [await _stored(stack, first.images[0].storage_id)]
    assert contents[2]["parts"] == [{"text": "as a charcoal drawing"}]
    assert inline_pictures(contents[3]) == [await _stored(stack, second.images[0].storage_id)]
    assert "her lantern goes out" in contents[4]["parts"][0]["text"] and inline_pictures(contents[4]) == []
    # The second call edited the first picture, shown once (as the model's turn).
    second_contents = gemini.generate_requests()[1].json()["contents"]
    assert [content["role"] for content in second_contents] == ["user", "model", "user"]
    assert inline_pictures(second_contents[1]) == [await _stored(stack, first.images[0].storage_id)]
    # The chain, walked back: its root and depth on every job, and listed by its root.
    assert [(job.root_job_id, job.chain_depth) for job in (first, second, third)] == [
        (first.job_id, 0), (first.job_id, 1), (first.job_id, 2)]  # fmt: skip
    assert (second.source_image_id, third.source_image_id) == (first.images[0].image_id, second.images[0].image_id)
    listed = await stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(user_id="u1", root_job_id=first.job_id))
    assert [job.job_id for job in listed.jobs] == [third.job_id, second.job_id, first.job_id]
    # Google's price for each call's usageMetadata: 12 text tokens and 258 per picture sent.
    assert [job.provider_cost_micros for job in (first, second, third)] == [
        _gemini_cost(12), _gemini_cost(12 + 258), _gemini_cost(12 + 2 * 258)]  # fmt: skip


async def test_a_three_turn_gpt_image_chain_edits_the_previous_result(openai_stack: JobsStack, openai: FakeOpenAIImages):
    stack = openai_stack
    await stack.credits.grant("u1", 10_000, "grant-chain")
    options = {"model": "openai/gpt-image-1", "width": 1024, "height": 1024, "quality": pb.QUALITY_LOW}
    first = await stack.final((await stack.create("u1", prompt="an empty bed", **options)).job.job_id)
    second = await stack.final((await stack.create("u1", prompt="a shape under the sheet", parent_job_id=first.job_id,
                                                   **_edit(operation=pb.EDIT_OPERATION_RESTYLE), **options)).job.job_id)  # fmt: skip
    third = await stack.final((await stack.create("u1", prompt="the sheet is moving", parent_job_id=second.job_id,
                                                  **_edit(operation=pb.EDIT_OPERATION_RESTYLE), **options)).job.job_id)  # fmt: skip
    assert third.status == pb.JOB_STATUS_COMPLETED, third.error_message

    second_call, third_call = openai.multipart_fields
    assert second_call["image"] == await _stored(stack, first.images[0].storage_id)
    assert third_call["image"] == await _stored(stack, second.images[0].storage_id)
    assert second_call["image"] != third_call["image"]
    assert "the sheet is moving" in third_call["prompt"] and third.chain_depth == 2


async def test_a_chain_deeper_than_fifty_is_refused_and_charges_nothing(stack: JobsStack):
    await stack.credits.grant("u1", 10_000, "grant-deep")
    parent = ""
    for depth in range(51):  # the root, then 50 jobs under it
        created = await stack.create("u1", parent_job_id=parent)
        assert created.job.chain_depth == depth
        parent = created.job.job_id
    balance = await stack.balance()

    details = await stack.refused("CreateGenerationJob", _request(parent_job_id=parent))

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields == ("parent_job_id",), details
    assert "51" in details.message
    assert await stack.balance() == balance and len(await job_rows(stack.db, "u1")) == 51


# ---------------------------------------------------------------- projects, canvases, stats


async def test_projects_and_canvases_list_and_count_only_the_users_jobs_with_their_cost(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    stack = openai_stack
    await stack.credits.grant("u1", 10_000, "grant-stats")
    await stack.credits.grant("u2", 10_000, "grant-stats")
    mine = [
        await stack.create("u1", project_id="p1", canvas_id="c1", model="openai/gpt-image-1", width=1024, height=1024,
                           quality=pb.QUALITY_HIGH),
        await stack.create("u1", project_id="p1", canvas_id="c2", model="openai/dall-e-2", width=256, height=256,
                           num_images=3),
        await stack.create("u1", project_id="p2", model="openai/dall-e-3", width=1792, height=1024, quality=pb.QUALITY_HD),
    ]  # fmt: skip
    theirs = await stack.create("u2", project_id="p1", canvas_id="c1", model="openai/dall-e-2", width=512, height=512)
    jobs = [await stack.final(created.job.job_id) for created in mine] + [await stack.final(theirs.job.job_id, "u2")]
    assert all(job.status == pb.JOB_STATUS_COMPLETED for job in jobs)
    # OpenAI's published prices: gpt-image-1 by its tokens (50 text in at $5/M, 4160 out
    # at $40/M for high 1024x1024), dall-e-2 $0.016 / $0.018 by size, dall-e-3 HD wide $0.12.
    expected = [50 * 5 + 4160 * 40, 3 * 16_000, 120_000, 18_000]
    assert [job.provider_cost_micros for job in jobs] == expected

    def listed(**fields):
        return stack.call("ListGenerationJobs", pb.ListGenerationJobsRequest(**fields))

    assert [job.job_id for job in (await listed(user_id="u1", project_id="p1")).jobs] == [jobs[1].job_id, jobs[0].job_id]
    assert [job.job_id for job in (await listed(user_id="u1", project_id="p1", canvas_id="c1")).jobs] == [jobs[0].job_id]
    assert [job.job_id for job in (await listed(user_id="u2", canvas_id="c1")).jobs] == [jobs[3].job_id]
    page = await listed(user_id="u1", project_id="p1", page_size=1)
    details = await stack.refused("ListGenerationJobs", pb.ListGenerationJobsRequest(
        user_id="u1", project_id="p2", page_token=page.next_page_token))  # fmt: skip
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields == ("page_token",)
    rest = await listed(user_id="u1", project_id="p1", page_size=1, page_token=page.next_page_token)
    assert [job.job_id for job in rest.jobs] == [jobs[0].job_id] and rest.next_page_token == ""

    stats = await stack.call("GetJobStats", pb.GetJobStatsRequest(user_id="u1", project_id="p1"))
    assert (stats.total_jobs, stats.success_rate) == (2, 1.0)
    assert stats.provider_cost_micros == expected[0] + expected[1]
    assert stats.credits_charged == 2400 + 3 * 200
    everyone = await stack.call("GetJobStats", pb.GetJobStatsRequest(project_id="p1"), caller="admin")
    assert everyone.total_jobs == 3 and everyone.provider_cost_micros == expected[0] + expected[1] + expected[3]
    user = await stack.call("GetJobStats", pb.GetJobStatsRequest(user_id="u1"))
    assert user.total_jobs == 3 and user.provider_cost_micros == sum(expected[:3])
    # The gateway sees a project only through a user's own jobs in it.
    details = await stack.refused("GetJobStats", pb.GetJobStatsRequest(project_id="p1"))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT and details.fields == ("user_id",)


# ---------------------------------------------------------------- faults


async def test_s3_down_delays_an_edit_and_a_source_deleted_meanwhile_fails_it_unrefunded(
    openai_stack: JobsStack, openai: FakeOpenAIImages
):
    stack = openai_stack
    await stack.credits.grant("u1", 10_000, "grant-fault")
    source = await _image_of(stack, width=96, height=64)
    await stack.extra["s3_proxy"].cut()
    created = await stack.create("u1", width=96, height=64, **_edit(source.image_id, pb.EDIT_OPERATION_RESTYLE))
    # The worker cannot fetch the source: the job waits (redelivered), nothing is painted.
    await eventually(lambda: _deliveries(stack, created.job.job_id, 3), what="retried deliveries")
    assert (await stack.get(created.job.job_id)).status == pb.JOB_STATUS_PROCESSING
    # The player deletes the source meanwhile (hidden at once; finished once S3 is back).
    details = await stack.refused("DeleteImage", pb.DeleteImageRequest(image_id=source.image_id, user_id="u1"))
    assert details.code == grpc.StatusCode.UNAVAILABLE

    # The next delivery finds the source gone, with S3 still away: the job ends.
    job = await stack.final(created.job.job_id, timeout=40)
    await stack.extra["s3_proxy"].restore()
    await stack.settled(job.job_id)
    await stack.call("DeleteImage", pb.DeleteImageRequest(image_id=source.image_id, user_id="u1"))  # finished now
    # The player's own doing: not refunded, as a content refusal is not.
    assert job.status == pb.JOB_STATUS_FAILED and "deleted before the edit ran" in job.error_message
    assert job.credits_refunded == 0 and job.images == []


async def _deliveries(stack: JobsStack, job_id: str, at_least: int) -> bool:
    return await stack.db.fetchval("SELECT deliveries FROM image.jobs WHERE job_id = $1", uuid.UUID(job_id)) >= at_least


async def test_a_recraft_job_records_its_credits_at_recrafts_unit_price(serve):
    async with FakeRecraft(image_size=None) as recraft, serve(
        RECRAFT_API_KEY=recraft.api_key, RECRAFT_BASE_URL=recraft.api_base_url, ALLOW_PRIVATE_DOWNLOADS="true"
    ) as stack:  # fmt: skip
        await stack.credits.grant("u1", 10_000, "grant-recraft")
        created = await stack.create("u1", model="recraft/recraftv3", width=1024, height=1024, num_images=2,
                                     project_id="p-recraft")  # fmt: skip
        job = await stack.final(created.job.job_id)
        assert job.status == pb.JOB_STATUS_COMPLETED, job.error_message
        # The answer's `credits` (40 units a picture) at $1 per 1,000 units.
        assert [request.json()["n"] for request in recraft.requests_to("/v1/images/generations")] == [2]
        assert job.provider_cost_micros == 2 * 40 * 1000
        stats = await stack.call("GetJobStats", pb.GetJobStatsRequest(user_id="u1", project_id="p-recraft"))
        assert stats.provider_cost_micros == 80_000


async def test_a_retry_spelling_the_parent_id_in_another_case_is_the_same_request(stack: JobsStack):
    parent = await stack.final((await stack.create("u1")).job.job_id)
    request_id = uuid.uuid4().hex

    def edit(parent_job_id: str) -> pb.CreateGenerationJobRequest:
        return _request(request_id=request_id, parent_job_id=parent_job_id, **_edit(operation=pb.EDIT_OPERATION_RESTYLE))

    first = await stack.call("CreateGenerationJob", edit(parent.job_id.upper()))
    again = await stack.call("CreateGenerationJob", edit(parent.job_id))

    assert again.job.job_id == first.job.job_id and again.credits_used == first.credits_used
    assert len(await charges_of(stack.db, "u1")) == 2  # the parent's charge and the edit's, once

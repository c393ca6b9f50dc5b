"""CreateGenerationJob to COMPLETED on real servers: the charge, the images, the storage."""

from __future__ import annotations

import io
import uuid

from PIL import Image

from casefile.image.v1 import image_service_pb2 as pb

from .helpers import JobsStack


async def test_a_job_is_charged_at_once_painted_stored_and_completed(stack: JobsStack):
    created = await stack.create("u1", num_images=2, width=96, height=80)

    assert created.job.status == pb.JOB_STATUS_PENDING
    assert (created.credits_used, created.credits_remaining) == (200, 800)
    assert await stack.balance("u1") == 800
    job = await stack.final(created.job.job_id)
    assert job.status == pb.JOB_STATUS_COMPLETED, job.error_message
    assert [(image.width, image.height) for image in job.images] == [(96, 80), (96, 80)]
    assert job.provider == "local" and job.credits_refunded == 0 and job.retry_count == 0
    assert job.processing_time_ms >= 0 and job.complete_time.seconds > 0
    sizes = 0
    for slot, image in enumerate(job.images):
        assert image.storage_id == f"users/u1/jobs/{job.job_id}/{slot}.png"
        stored = await stack.s3.get_object(Bucket=stack.bucket, Key=image.storage_id)
        body = await stored["Body"].read()
        assert stored["ContentType"] == "image/png" and stored["ServerSideEncryption"] == "AES256"
        assert len(body) == image.size_bytes
        assert Image.open(io.BytesIO(body)).size == (96, 80)
        sizes += image.size_bytes
    await stack.settled(job.job_id)
    account = await stack.credits.account("u1")
    assert account.storage_used_bytes == sizes
    generation = await stack.db.fetchrow("SELECT * FROM credits.generations WHERE job_id = $1", job.job_id)
    assert (generation["images_requested"], generation["images_delivered"], generation["bytes_stored"]) == (2, 2, sizes)
    row = await stack.db.fetchrow("SELECT status, charge_attempt FROM image.jobs WHERE job_id = $1", uuid.UUID(job.job_id))
    assert (row["status"], row["charge_attempt"]) == ("COMPLETED", 1)


async def test_a_user_id_that_is_no_plain_folder_name_still_gets_its_images_stored(stack: JobsStack):
    for user_id in ("a//b", "..", "x/../../escape", "ü" * 128):
        created = await stack.create(user_id, num_images=1, width=64, height=64)
        job = await stack.final(created.job.job_id, user_id)

        assert job.status == pb.JOB_STATUS_COMPLETED, job.error_message
        [image] = job.images
        folder = image.storage_id.split("/")[1]
        assert image.storage_id == f"users/{folder}/jobs/{job.job_id}/0.png" and folder.startswith("!")
        stored = await stack.s3.get_object(Bucket=stack.bucket, Key=image.storage_id)
        assert len(await stored["Body"].read()) == image.size_bytes


async def test_each_image_of_a_previewed_job_is_its_own_picture(stack: JobsStack):
    # With previews each image is a call of its own; the painter must still draw each apart.
    created = await stack.create("u1", num_images=3, width=64, height=64, partial_images=2)
    job = await stack.final(created.job.job_id)

    assert job.status == pb.JOB_STATUS_COMPLETED, job.error_message
    bodies = []
    for image in job.images:
        stored = await stack.s3.get_object(Bucket=stack.bucket, Key=image.storage_id)
        bodies.append(await stored["Body"].read())
    assert len(set(bodies)) == 3

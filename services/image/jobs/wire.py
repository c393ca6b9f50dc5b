"""A job as the protobuf GenerationJob, for the RPCs and for `image.job.completed` alike.

No grpc here: the handlers answer with it, and storage writes the completion event with it
inside the transaction that makes a job final (so the event says exactly what was committed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


from casefile.image.v1 import image_events_pb2
from casefile.image.v1 import image_service_pb2 as pb
from services.image.catalog import EditOperation, Quality
from services.image.jobs.storage import JobRow, JobStatus
from shared.proto_time import to_timestamp

JOB_STATUS_PROTO = {
    JobStatus.PENDING: pb.JOB_STATUS_PENDING,
    JobStatus.PROCESSING: pb.JOB_STATUS_PROCESSING,
    JobStatus.UPLOADING: pb.JOB_STATUS_UPLOADING,
    JobStatus.COMPLETED: pb.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: pb.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: pb.JOB_STATUS_CANCELLED,
}
QUALITY_PROTO = {
    Quality.STANDARD: pb.QUALITY_STANDARD,
    Quality.HD: pb.QUALITY_HD,
    Quality.LOW: pb.QUALITY_LOW,
    Quality.MEDIUM: pb.QUALITY_MEDIUM,
    Quality.HIGH: pb.QUALITY_HIGH,
}
EDIT_OPERATION_PROTO = {
    EditOperation.INPAINT: pb.EDIT_OPERATION_INPAINT,
    EditOperation.OUTPAINT: pb.EDIT_OPERATION_OUTPAINT,
    EditOperation.VARIATION: pb.EDIT_OPERATION_VARIATION,
    EditOperation.REMOVE_BACKGROUND: pb.EDIT_OPERATION_REMOVE_BACKGROUND,
    EditOperation.RESTYLE: pb.EDIT_OPERATION_RESTYLE,
}
_KIND_PROTO = {"GENERATE": pb.JOB_KIND_GENERATE, "EDIT": pb.JOB_KIND_EDIT}


def processing_time_ms(row: JobRow) -> int:
    """From PROCESSING to the final status; 0 until both are known."""
    if row.start_time is None or row.complete_time is None:
        return 0
    return max(0, int((row.complete_time - row.start_time).total_seconds() * 1000))


def job_message(row: JobRow, images: Sequence[Any]) -> pb.GenerationJob:
    """`images`: the delivered ones, each with image_id, storage_id, content_type,
    size_bytes, width and height (a domain JobImage or a storage SlotRow)."""
    message = pb.GenerationJob(
        job_id=str(row.job_id),
        user_id=row.user_id,
        prompt=row.prompt,
        model=row.model,
        width=row.width,
        height=row.height,
        num_images=row.num_images,
        status=JOB_STATUS_PROTO[row.status],
        images=[
            pb.Image(image_id=str(image.image_id), storage_id=image.storage_id or "",
                     content_type=image.content_type or "image/png", size_bytes=image.size_bytes or 0,
                     width=image.width or 0, height=image.height or 0)  # fmt: skip
            for image in images
        ],
        retry_count=row.retry_count,
        error_message=row.error_message,
        credits_charged=row.credits_charged,
        credits_refunded=row.credits_refunded,
        create_time=to_timestamp(row.create_time),
        update_time=to_timestamp(row.update_time),
        processing_time_ms=processing_time_ms(row),
        kind=_KIND_PROTO.get(row.kind, pb.JOB_KIND_GENERATE),
        parent_job_id=str(row.parent_job_id) if row.parent_job_id else "",
        project_id=row.project_id or "",
        quality=QUALITY_PROTO.get(Quality(row.quality), pb.QUALITY_UNSPECIFIED) if row.quality else pb.QUALITY_UNSPECIFIED,
        provider=row.provider or "",
        source_image_id=str(row.source_image_id) if row.source_image_id else "",
        edit_operation=(EDIT_OPERATION_PROTO[EditOperation(row.edit_operation)] if row.edit_operation
                        else pb.EDIT_OPERATION_UNSPECIFIED),  # fmt: skip
        canvas_id=row.canvas_id or "",
        provider_cost_micros=row.provider_cost_microdollars,
        root_job_id=str(row.root_job_id or row.job_id),
        chain_depth=row.chain_depth,
        partial_images=row.partial_images,
    )
    if row.complete_time is not None:
        message.complete_time.CopyFrom(to_timestamp(row.complete_time))
    return message


def completed_event(row: JobRow, images: Sequence[Any]) -> bytes:
    """The payload of `image.job.completed`: the job as its final write committed it."""
    return image_events_pb2.GenerationJobCompleted(job=job_message(row, images)).SerializeToString()


def preview_payload(*, image_index: int, preview_index: int, data: bytes, content_type: str, width: int,
                    height: int) -> bytes:  # fmt: skip
    """A JobPreview as it travels over NATS and into WatchGenerationJobResponse.preview."""
    return pb.JobPreview(image_index=image_index, preview_index=preview_index, data=data, content_type=content_type,
                         width=width, height=height).SerializeToString()  # fmt: skip

"""The jobs' messages as they are stored in the outbox and published on JetStream (the
completion event's payload is encoded by jobs.wire, from the final job)."""

from __future__ import annotations

import uuid

from casefile.image.v1 import image_events_pb2
from shared.streams import JOB_COMPLETED_SUBJECT, JOB_QUEUED_SUBJECT


def job_queued_msg_id(job_id: uuid.UUID, charge_attempt: int) -> str:
    """Nats-Msg-Id: one message per charge attempt of a job, however often it is published."""
    return f"{JOB_QUEUED_SUBJECT}:{job_id}:{charge_attempt}"


def job_completed_msg_id(job_id: uuid.UUID) -> str:
    """Nats-Msg-Id of `image.job.completed`: one per job (a job reaches a final status once)."""
    return f"{JOB_COMPLETED_SUBJECT}:{job_id}"


def encode_job_queued(job_id: uuid.UUID, user_id: str, charge_attempt: int) -> bytes:
    return image_events_pb2.GenerationJobQueued(
        job_id=str(job_id), user_id=user_id, charge_attempt=charge_attempt
    ).SerializeToString()


def decode_job_queued(data: bytes) -> tuple[uuid.UUID, int]:
    """(job_id, charge_attempt); DecodeError or ValueError when the message is unusable."""
    message = image_events_pb2.GenerationJobQueued.FromString(data)
    return uuid.UUID(message.job_id), max(message.charge_attempt, 1)

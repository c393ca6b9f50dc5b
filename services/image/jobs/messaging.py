"""Generation jobs on NATS: the jobs' outbox relayed to IMAGE_JOBS by shared.outbox, and
`image.job.queued` consumed through the shared durable consumer by every image process.

Job deliveries are unlimited: a job ends by its own deadline (worker.py), and a final job
is acknowledged only once its refunds are settled, so no message may run out of
deliveries and leave money owed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext

from services.image.durable_consumer import ConsumerSettings, Delivery, DurableConsumer, Outcome, term
from services.image.jobs.events import decode_job_queued
from services.image.jobs.metrics import JOB_DELIVERIES
from shared.config import NatsSettings, Secret
from shared.nats import ensure_stream
from shared.outbox import OutboxRelay, OutboxTable, RelaySettings
from shared.streams import IMAGE_JOBS, JOB_QUEUED_SUBJECT, JOBS_DURABLE

log = logging.getLogger(__name__)

JOB_OUTBOX = OutboxTable(
    table="image.job_outbox", channel="image_job_outbox", log_columns={"job_id": "job_id"},
    available_column="available_at",
)  # fmt: skip
# Between deliveries that failed for reasons of our own (a database, S3 or credits away);
# provider retries ask for their own delays (2, 4, 8 s), which are never shortened.
JOB_REDELIVERY_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

RunJob = Callable[[uuid.UUID], Awaitable[Outcome]]


@dataclass(frozen=True)
class JobConsumerSettings:
    nats: NatsSettings
    concurrency: int
    max_ack_pending: int
    ack_wait_seconds: float
    max_work_seconds: float
    stream_replicas: int = 1
    shutdown_grace_seconds: float = 5.0
    redelivery_backoff_seconds: tuple[float, ...] = JOB_REDELIVERY_BACKOFF_SECONDS


def job_consumer(settings: JobConsumerSettings, run: RunJob) -> DurableConsumer:
    """The consumer of image.job.queued shared by every image process."""

    async def handle(delivery: Delivery) -> Outcome:
        try:
            job_id, _attempt = decode_job_queued(delivery.data)
        except (DecodeError, ValueError) as error:
            log.error("job.message_rejected", extra={"delivery": delivery.number, "error": str(error)})
            JOB_DELIVERIES.labels("terminated").inc()
            return term(str(error))
        return await run(job_id)

    return DurableConsumer(
        ConsumerSettings(
            nats=settings.nats,
            stream=IMAGE_JOBS,
            durable=JOBS_DURABLE,
            filter_subject=JOB_QUEUED_SUBJECT,
            concurrency=settings.concurrency,
            max_deliver=None,
            max_ack_pending=settings.max_ack_pending,
            redelivery_backoff_seconds=settings.redelivery_backoff_seconds,
            ack_wait_seconds=settings.ack_wait_seconds,
            max_work_seconds=settings.max_work_seconds,
            stream_replicas=settings.stream_replicas,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            client_name="image-jobs",
        ),
        handle,
    )


def job_outbox_relay(
    pool: asyncpg.Pool, dsn: Secret[str], nats: NatsSettings, *, settings: RelaySettings, stream_replicas: int
) -> OutboxRelay:
    """The relay of image.job_outbox, which declares IMAGE_JOBS before its first publish."""

    async def prepare(js: JetStreamContext) -> None:
        await ensure_stream(js, IMAGE_JOBS, replicas=stream_replicas)

    return OutboxRelay(pool, dsn, nats, JOB_OUTBOX, client_name="image-job-outbox", settings=settings, prepare=prepare)

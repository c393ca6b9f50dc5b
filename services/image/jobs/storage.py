"""Plain SQL over asyncpg for generation jobs; every function takes a connection.

Every write a worker makes names its lease owner and a non-final status (fencing), so a
worker whose lease lapsed, or whose job was cancelled, can never overwrite what happened
since. CancelGenerationJob clears the lease in the same statement that ends the job.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime

import asyncpg

from services.image.jobs.events import encode_job_queued, job_completed_msg_id, job_queued_msg_id
from shared.db import is_unavailable  # noqa: F401 - the use cases call storage.is_unavailable
from shared.streams import JOB_COMPLETED_SUBJECT, JOB_QUEUED_SUBJECT


class JobStatus(enum.StrEnum):
    CHARGING = "CHARGING"  # an intent: the charge is under way (never shown)
    ABANDONING = "ABANDONING"  # the create never came back; its charge is being refunded
    ABANDONED = "ABANDONED"  # refunded (or never charged); a repeat may revive it
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    UPLOADING = "UPLOADING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class SlotStatus(enum.StrEnum):
    PENDING = "PENDING"  # no picture yet
    GENERATED = "GENERATED"  # the provider's picture is kept in the row
    DELIVERED = "DELIVERED"  # in S3, storage reserved
    FAILED = "FAILED"  # will never be delivered (refund says what it gives back)
    DELETING = "DELETING"  # DeleteImage under way
    DELETED = "DELETED"


FINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
VISIBLE_STATUSES_ORDERED = (
    JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.UPLOADING, JobStatus.COMPLETED, JobStatus.FAILED,
    JobStatus.CANCELLED,
)  # fmt: skip
VISIBLE_STATUSES = frozenset(VISIBLE_STATUSES_ORDERED)
OPEN_SLOT_STATUSES = frozenset({SlotStatus.PENDING, SlotStatus.GENERATED})
_VISIBLE_SQL = "('PENDING', 'PROCESSING', 'UPLOADING', 'COMPLETED', 'FAILED', 'CANCELLED')"
_RUNNING_SQL = "('PENDING', 'PROCESSING', 'UPLOADING')"



@dataclass(frozen=True)
class NewJob:
    job_id: uuid.UUID
    user_id: str
    request_id: str
    request_digest: str
    kind: str
    model: str
    prompt: str
    width: int
    height: int
    num_images: int
    quality: str | None
    project_id: str | None
    parent_job_id: uuid.UUID | None
    unit_price: int
    credits_charged: int
    # The editor's fields (0004_edit_jobs.sql); a GENERATE job leaves them empty.
    source_image_id: uuid.UUID | None = None
    edit_operation: str | None = None
    canvas_id: str | None = None
    root_job_id: uuid.UUID | None = None
    chain_depth: int = 0
    mask: bytes | None = None
    # Previews per image (0007_job_previews.sql): 0 to 3.
    partial_images: int = 0


@dataclass(frozen=True)
class JobRow:
    job_id: uuid.UUID
    user_id: str
    request_id: str
    request_digest: str
    kind: str
    model: str
    prompt: str
    width: int
    height: int
    num_images: int
    quality: str | None
    source_image_id: uuid.UUID | None
    edit_operation: str | None
    parent_job_id: uuid.UUID | None
    project_id: str | None
    canvas_id: str | None
    status: JobStatus
    unit_price: int
    credits_charged: int
    credits_refunded: int
    charge_attempt: int
    charge_id: str | None
    balance_after: int | None
    retry_count: int
    error_message: str
    provider: str | None
    provider_cost_microdollars: int
    deliveries: int
    settled: bool
    create_time: datetime
    update_time: datetime
    start_time: datetime | None
    complete_time: datetime | None
    # The first job of its chain (itself when it has no parent; None only for a row written
    # by a process older than 0004_edit_jobs.sql), and how many parents lie between.
    root_job_id: uuid.UUID | None
    chain_depth: int
    # Previews per image the job asked for (0: none).
    partial_images: int = 0


@dataclass(frozen=True)
class SlotRow:
    job_id: uuid.UUID
    slot: int
    image_id: uuid.UUID
    status: SlotStatus
    content_type: str | None
    size_bytes: int | None
    width: int | None
    height: int | None
    storage_id: str | None
    reserved_bytes: int | None
    error: str | None
    refund: int
    refunded: bool


_JOB_COLUMNS = ", ".join(f"j.{item.name}" for item in fields(JobRow))
_SLOT_COLUMNS = ", ".join(f"i.{item.name}" for item in fields(SlotRow))


def _job(record: asyncpg.Record | None) -> JobRow | None:
    if record is None:
        return None
    values = {item.name: record[item.name] for item in fields(JobRow)}
    values["status"] = JobStatus(values["status"])
    return JobRow(**values)


def _slot(record: asyncpg.Record) -> SlotRow:
    values = {item.name: record[item.name] for item in fields(SlotRow)}
    values["status"] = SlotStatus(values["status"])
    return SlotRow(**values)


def _updated(command_tag: str) -> int:
    return int(command_tag.rsplit(" ", 1)[-1])


# ---------------------------------------------------------------- create


async def get_job(conn: asyncpg.Connection, job_id: uuid.UUID, *, timeout: float) -> JobRow | None:
    return _job(await conn.fetchrow(f"SELECT {_JOB_COLUMNS} FROM image.jobs j WHERE j.job_id = $1", job_id,
                                    timeout=timeout))  # fmt: skip


async def insert_intent(conn: asyncpg.Connection, job: NewJob, intent_seconds: float, *, timeout: float) -> bool:
    """The job as CHARGING and its queue message held for `intent_seconds`, in one statement
    (so one round trip, atomic); False if the job exists already."""
    values = [getattr(job, item.name) for item in fields(NewJob)]
    columns = ", ".join(item.name for item in fields(NewJob))
    placeholders = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    first = len(values) + 1
    return bool(
        await conn.fetchval(
            f"""
            WITH job AS (
                INSERT INTO image.jobs ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING RETURNING job_id),
            queued AS (
                INSERT INTO image.job_outbox (job_id, subject, msg_id, payload, available_at)
                SELECT job_id, ${first}, ${first + 1}, ${first + 2}, now() + make_interval(secs => ${first + 3})
                  FROM job
                ON CONFLICT (msg_id) DO NOTHING)
            SELECT count(*) = 1 FROM job
            """,
            *values,
            JOB_QUEUED_SUBJECT,
            job_queued_msg_id(job.job_id, 1),
            encode_job_queued(job.job_id, job.user_id, 1),
            intent_seconds,
            timeout=timeout,
        )
    )


async def _queue(
    conn: asyncpg.Connection, job_id: uuid.UUID, user_id: str, attempt: int, hold_seconds: float, *, timeout: float
) -> None:
    await conn.execute(
        """
        INSERT INTO image.job_outbox (job_id, subject, msg_id, payload, available_at)
        VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
        ON CONFLICT (msg_id) DO NOTHING
        """,
        job_id,
        JOB_QUEUED_SUBJECT,
        job_queued_msg_id(job_id, attempt),
        encode_job_queued(job_id, user_id, attempt),
        hold_seconds,
        timeout=timeout,
    )


async def revive_intent(
    conn: asyncpg.Connection, job_id: uuid.UUID, attempt: int, intent_seconds: float, *, timeout: float
) -> bool:
    """An ABANDONED job charges again under attempt + 1 (a repeat of its request came)."""
    async with conn.transaction():
        user_id = await conn.fetchval(
            """
            UPDATE image.jobs
               SET status = 'CHARGING', charge_attempt = charge_attempt + 1, charge_id = NULL,
                   balance_after = NULL, credits_refunded = 0, create_time = clock_timestamp(),
                   update_time = clock_timestamp()
             WHERE job_id = $1 AND status = 'ABANDONED' AND charge_attempt = $2
            RETURNING user_id
            """,
            job_id,
            attempt,
            timeout=timeout,
        )
        if user_id is None:
            return False
        await _queue(conn, job_id, user_id, attempt + 1, intent_seconds, timeout=timeout)
    return True


async def drop_refused_intent(conn: asyncpg.Connection, job_id: uuid.UUID, attempt: int, *, timeout: float) -> None:
    """Nothing was charged: the intent is over, and its held message goes with it."""
    async with conn.transaction():
        await conn.execute(
            """UPDATE image.jobs SET status = 'ABANDONED', update_time = clock_timestamp()
                WHERE job_id = $1 AND status = 'CHARGING' AND charge_attempt = $2""",
            job_id,
            attempt,
            timeout=timeout,
        )
        await conn.execute(
            "DELETE FROM image.job_outbox WHERE msg_id = $1 AND published_at IS NULL",
            job_queued_msg_id(job_id, attempt),
            timeout=timeout,
        )


async def commit_charged_job(
    conn: asyncpg.Connection, job_id: uuid.UUID, attempt: int, charge_id: str, balance: int, *, timeout: float
) -> JobRow | None:
    """PENDING with its charge, its image slots, and its message released, in one statement;
    None unless the intent was still CHARGING under this attempt, with no worker abandoning
    it (a twin committed, or it was abandoned)."""
    return _job(
        await conn.fetchrow(
            f"""
            WITH j AS (
                UPDATE image.jobs j
                   SET status = 'PENDING', charge_id = $3, balance_after = $4, update_time = clock_timestamp()
                 WHERE j.job_id = $1 AND j.status = 'CHARGING' AND j.charge_attempt = $2 AND j.lease_owner IS NULL
                RETURNING {_JOB_COLUMNS}),
            slots AS (
                INSERT INTO image.job_images (job_id, slot, image_id)
                SELECT j.job_id, slot, gen_random_uuid() FROM j, generate_series(0, j.num_images - 1) AS slot
                ON CONFLICT DO NOTHING),
            released AS (
                UPDATE image.job_outbox SET available_at = NULL
                 WHERE msg_id = $5 AND EXISTS (SELECT 1 FROM j))
            SELECT * FROM j
            """,
            job_id,
            attempt,
            charge_id,
            balance,
            job_queued_msg_id(job_id, attempt),
            timeout=timeout,
        )
    )


# ---------------------------------------------------------------- reads


@dataclass(frozen=True)
class JobFilter:
    """What ListGenerationJobs narrows the user's jobs to; None leaves a field open."""

    status: JobStatus | None = None
    project_id: str | None = None
    canvas_id: str | None = None
    root_job_id: uuid.UUID | None = None


async def list_jobs(
    conn: asyncpg.Connection,
    user_id: str,
    status: JobStatus | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
    *,
    timeout: float,
    where: JobFilter | None = None,
) -> list[JobRow]:
    """The user's jobs, newest first (only ever theirs: a project, canvas or chain filter
    narrows them, it never widens them to another user's)."""
    after_time, after_id = after if after else (None, None)
    where = where or JobFilter()
    records = await conn.fetch(
        f"""
        SELECT {_JOB_COLUMNS} FROM image.jobs j
         WHERE j.user_id = $1 AND j.status IN {_VISIBLE_SQL}
           AND ($2::text IS NULL OR j.status = $2)
           AND ($3::timestamptz IS NULL OR (j.create_time, j.job_id) < ($3, $4::uuid))
           AND ($6::text IS NULL OR j.project_id = $6)
           AND ($7::text IS NULL OR j.canvas_id = $7)
           AND ($8::uuid IS NULL OR coalesce(j.root_job_id, j.job_id) = $8)
         ORDER BY j.create_time DESC, j.job_id DESC
         LIMIT $5
        """,
        user_id,
        status.value if status else None,
        after_time,
        after_id,
        limit,
        where.project_id,
        where.canvas_id,
        where.root_job_id,
        timeout=timeout,
    )
    return [_job(record) for record in records]  # type: ignore[misc]


async def delivered_images(
    conn: asyncpg.Connection, job_ids: Sequence[uuid.UUID], *, timeout: float
) -> dict[uuid.UUID, list[SlotRow]]:
    if not job_ids:
        return {}
    records = await conn.fetch(
        f"""SELECT {_SLOT_COLUMNS} FROM image.job_images i
             WHERE i.job_id = ANY($1::uuid[]) AND i.status = 'DELIVERED' ORDER BY i.job_id, i.slot""",
        list(job_ids),
        timeout=timeout,
    )
    found: dict[uuid.UUID, list[SlotRow]] = {}
    for record in records:
        found.setdefault(record["job_id"], []).append(_slot(record))
    return found


async def job_slots(conn: asyncpg.Connection, job_id: uuid.UUID, *, timeout: float) -> list[SlotRow]:
    records = await conn.fetch(
        f"SELECT {_SLOT_COLUMNS} FROM image.job_images i WHERE i.job_id = $1 ORDER BY i.slot", job_id, timeout=timeout
    )
    return [_slot(record) for record in records]


async def start_uploading(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, *, timeout: float
) -> list[tuple[SlotRow, bytes]] | None:
    """The GENERATED slots with their kept pictures, in slot order, the job made UPLOADING
    under our lease when there are any, in one statement; None when there are some but the
    job is no longer ours."""
    records = await conn.fetch(
        f"""
        WITH kept AS (
            SELECT {_SLOT_COLUMNS}, i.png FROM image.job_images i WHERE i.job_id = $1 AND i.status = 'GENERATED'),
        job AS (
            UPDATE image.jobs SET status = 'UPLOADING', start_time = coalesce(start_time, clock_timestamp()),
                   update_time = clock_timestamp()
             WHERE job_id = $1 AND lease_owner = $2 AND status IN {_RUNNING_SQL} AND EXISTS (SELECT FROM kept)
            RETURNING job_id)
        SELECT kept.*, EXISTS (SELECT FROM job) AS held FROM kept ORDER BY kept.slot
        """,
        job_id,
        owner,
        timeout=timeout,
    )
    if records and not records[0]["held"]:
        return None
    return [(_slot(record), record["png"]) for record in records]


async def user_has_image(conn: asyncpg.Connection, user_id: str, storage_id: str, *, timeout: float) -> bool:
    return bool(
        await conn.fetchval(
            """SELECT true FROM image.job_images i JOIN image.jobs j USING (job_id)
                WHERE i.storage_id = $1 AND j.user_id = $2 AND i.status = 'DELIVERED'""",
            storage_id,
            user_id,
            timeout=timeout,
        )
    )


@dataclass(frozen=True)
class StatsTotals:
    counts: dict[JobStatus, int]
    credits_charged: int
    credits_refunded: int
    average_processing_time_ms: int
    provider_cost_microdollars: int = 0


async def job_stats(
    conn: asyncpg.Connection, user_id: str | None, project_id: str | None, *, timeout: float
) -> StatsTotals:
    records = await conn.fetch(
        f"""
        SELECT status, count(*) AS jobs, sum(credits_charged) AS charged, sum(credits_refunded) AS refunded,
               sum(provider_cost_microdollars) AS provider_cost,
               sum(extract(epoch FROM complete_time - start_time) * 1000)
                   FILTER (WHERE complete_time IS NOT NULL AND start_time IS NOT NULL) AS processing_ms,
               count(*) FILTER (WHERE complete_time IS NOT NULL AND start_time IS NOT NULL) AS timed
          FROM image.jobs
         WHERE status IN {_VISIBLE_SQL}
           AND ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR project_id = $2)
         GROUP BY status
        """,
        user_id,
        project_id,
        timeout=timeout,
    )
    timed = sum(record["timed"] for record in records)
    processing = sum(float(record["processing_ms"] or 0) for record in records)
    return StatsTotals(
        counts={JobStatus(record["status"]): record["jobs"] for record in records},
        credits_charged=sum(int(record["charged"] or 0) for record in records),
        credits_refunded=sum(int(record["refunded"] or 0) for record in records),
        average_processing_time_ms=round(processing / timed) if timed else 0,
        provider_cost_microdollars=sum(int(record["provider_cost"] or 0) for record in records),
    )


# ---------------------------------------------------------------- cancel, settle, delete


async def cancel_job(
    conn: asyncpg.Connection, job_id: uuid.UUID, user_id: str, *, announce: CompletedEvent, timeout: float
) -> tuple[JobRow, bool] | None:
    """(the job, whether this call cancelled it); None when it is not the user's to see.
    The slots not delivered yet fail, each owing its price back; the completion event is
    queued with it."""
    async with conn.transaction():
        row = _job(
            await conn.fetchrow(
                f"SELECT {_JOB_COLUMNS} FROM image.jobs j WHERE j.job_id = $1 AND j.user_id = $2 FOR UPDATE",
                job_id,
                user_id,
                timeout=timeout,
            )
        )
        if row is None or row.status not in VISIBLE_STATUSES:
            return None
        if row.status in FINAL_STATUSES:
            return row, False
        await _fail_open_slots(conn, job_id, "cancelled by the user", refund=True, timeout=timeout)
        row = await _end_job(conn, job_id, JobStatus.CANCELLED, "cancelled by the user", timeout=timeout)
        await _queue_completed(conn, row, announce, timeout=timeout)
    return row, True


# Encodes `image.job.completed` from the final job and its delivered images (jobs.wire).
CompletedEvent = Callable[[JobRow, Sequence[SlotRow]], bytes]
_QUEUE_COMPLETED_SQL = "INSERT INTO image.job_outbox (job_id, subject, msg_id, payload)"


async def _queue_completed(conn: asyncpg.Connection, row: JobRow, announce: CompletedEvent, *, timeout: float) -> None:
    """The job's completion event into the outbox, in the transaction that made it final
    (so it is published exactly when the job did end). Its msg_id is the job's: a job
    ends once, and the UNIQUE msg_id would refuse a second event anyway."""
    images = (await delivered_images(conn, [row.job_id], timeout=timeout)).get(row.job_id, [])
    await conn.execute(
        f"{_QUEUE_COMPLETED_SQL} VALUES ($1, $2, $3, $4) ON CONFLICT (msg_id) DO NOTHING",
        row.job_id,
        JOB_COMPLETED_SUBJECT,
        job_completed_msg_id(row.job_id),
        announce(row, images),
        timeout=timeout,
    )


async def _fail_open_slots(
    conn: asyncpg.Connection, job_id: uuid.UUID, error: str, *, refund: bool, slots: Sequence[int] | None = None,
    timeout: float,
) -> None:  # fmt: skip
    """Every slot not yet delivered (or only `slots`) fails; with `refund`, each owes its
    price back, and the job's credits_refunded says so in the same transaction."""
    await conn.execute(
        """
        WITH failed AS (
            UPDATE image.job_images i
               SET status = 'FAILED', png = NULL, error = $2, update_time = clock_timestamp(),
                   refund = CASE WHEN $3 THEN j.unit_price ELSE 0 END
              FROM image.jobs j
             WHERE i.job_id = $1 AND j.job_id = i.job_id AND i.status IN ('PENDING', 'GENERATED')
               AND ($4::int[] IS NULL OR i.slot = ANY($4::int[]))
            RETURNING i.refund)
        UPDATE image.jobs SET credits_refunded = credits_refunded + (SELECT coalesce(sum(refund), 0) FROM failed),
                              update_time = clock_timestamp()
         WHERE job_id = $1
        """,
        job_id,
        error[:1000],
        refund,
        list(slots) if slots is not None else None,
        timeout=timeout,
    )


async def _end_job(conn: asyncpg.Connection, job_id: uuid.UUID, status: JobStatus, error: str, *, timeout: float) -> JobRow:
    row = _job(
        await conn.fetchrow(
            f"""
            UPDATE image.jobs j
               SET status = $2, error_message = $3, lease_owner = NULL, lease_until = NULL,
                   complete_time = clock_timestamp(), update_time = clock_timestamp()
             WHERE j.job_id = $1
            RETURNING {_JOB_COLUMNS}
            """,
            job_id,
            status.value,
            error[:1000],
            timeout=timeout,
        )
    )
    assert row is not None
    return row


async def mark_refunded(conn: asyncpg.Connection, job_id: uuid.UUID, slot: int, *, timeout: float) -> None:
    await conn.execute(
        "UPDATE image.job_images SET refunded = true WHERE job_id = $1 AND slot = $2", job_id, slot, timeout=timeout
    )


async def mark_settled(conn: asyncpg.Connection, job_id: uuid.UUID, *, timeout: float) -> JobRow | None:
    return _job(
        await conn.fetchrow(
            f"UPDATE image.jobs j SET settled = true WHERE j.job_id = $1 RETURNING {_JOB_COLUMNS}", job_id, timeout=timeout
        )
    )


async def start_image_deletion(
    conn: asyncpg.Connection, image_id: uuid.UUID, user_id: str, *, timeout: float
) -> SlotRow | None:
    """The user's delivered (or half-deleted) image, now DELETING; None when there is none."""
    record = await conn.fetchrow(
        f"""
        UPDATE image.job_images i SET status = 'DELETING', update_time = clock_timestamp()
          FROM image.jobs j
         WHERE i.image_id = $1 AND j.job_id = i.job_id AND j.user_id = $2 AND i.status IN ('DELIVERED', 'DELETING')
        RETURNING {_SLOT_COLUMNS}
        """,
        image_id,
        user_id,
        timeout=timeout,
    )
    return _slot(record) if record is not None else None


async def finish_image_deletion(conn: asyncpg.Connection, image_id: uuid.UUID, *, timeout: float) -> None:
    async with conn.transaction():
        job_id = await conn.fetchval(
            """UPDATE image.job_images SET status = 'DELETED', update_time = clock_timestamp()
                WHERE image_id = $1 AND status = 'DELETING' RETURNING job_id""",
            image_id,
            timeout=timeout,
        )
        if job_id is not None:  # the job's images changed: its watchers hear of it
            await conn.execute("UPDATE image.jobs SET update_time = clock_timestamp() WHERE job_id = $1", job_id,
                               timeout=timeout)  # fmt: skip


# ---------------------------------------------------------------- the worker


@dataclass(frozen=True)
class JobClaim:
    row: JobRow
    # False when another worker holds a live lease on the job (or it is not takeable).
    claimed: bool
    lease_seconds_left: float
    # Since the job's last change: how old an intent is.
    age_seconds: float


async def claim_job(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    owner: uuid.UUID,
    lease_seconds: float,
    intent_seconds: float,
    *,
    timeout: float,
) -> JobClaim | None:
    """Counts a delivery and takes the lease of a job that is running (or an intent older
    than `intent_seconds`, or one being abandoned) and not leased by a live worker."""
    takeable = f"""(j.status IN ('ABANDONING', {_RUNNING_SQL[1:-1]})
                    OR (j.status = 'CHARGING' AND j.update_time < now() - make_interval(secs => $4)))
                   AND (j.lease_until IS NULL OR j.lease_until < now())"""
    record = await conn.fetchrow(
        f"""
        UPDATE image.jobs j SET
            deliveries = j.deliveries + 1,
            lease_owner = CASE WHEN {takeable} THEN $2 ELSE j.lease_owner END,
            lease_until = CASE WHEN {takeable} THEN now() + make_interval(secs => $3) ELSE j.lease_until END,
            -- Taken for the first time: PROCESSING from now on.
            status = CASE WHEN {takeable} AND j.status = 'PENDING' THEN 'PROCESSING' ELSE j.status END,
            start_time = CASE WHEN {takeable} AND j.status = 'PENDING' THEN clock_timestamp() ELSE j.start_time END,
            update_time = CASE WHEN {takeable} AND j.status = 'PENDING' THEN clock_timestamp() ELSE j.update_time END
         WHERE j.job_id = $1
        RETURNING {_JOB_COLUMNS}, j.lease_owner IS NOT DISTINCT FROM $2 AS claimed,
                  coalesce(extract(epoch FROM j.lease_until - now()), 0)::float8 AS lease_seconds_left,
                  extract(epoch FROM now() - j.update_time)::float8 AS age_seconds
        """,
        job_id,
        owner,
        lease_seconds,
        intent_seconds,
        timeout=timeout,
    )
    if record is None:
        return None
    return JobClaim(
        _job(record),  # type: ignore[arg-type]
        record["claimed"],
        max(record["lease_seconds_left"], 0.0),
        record["age_seconds"],
    )


async def renew_lease(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, lease_seconds: float, *, timeout: float
) -> bool:
    result = await conn.execute(
        """UPDATE image.jobs SET lease_until = now() + make_interval(secs => $3)
            WHERE job_id = $1 AND lease_owner = $2""",
        job_id,
        owner,
        lease_seconds,
        timeout=timeout,
    )
    return _updated(result) == 1


async def renew_leases(
    conn: asyncpg.Connection, leases: Sequence[tuple[uuid.UUID, uuid.UUID]], lease_seconds: float, *, timeout: float
) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """Pushes every (job_id, owner) lease still held to now + lease_seconds; those it renewed."""
    records = await conn.fetch(
        """UPDATE image.jobs j SET lease_until = now() + make_interval(secs => $3)
             FROM unnest($1::uuid[], $2::uuid[]) AS l(job_id, owner)
            WHERE j.job_id = l.job_id AND j.lease_owner = l.owner
           RETURNING j.job_id, j.lease_owner""",
        [job_id for job_id, _ in leases],
        [owner for _, owner in leases],
        lease_seconds,
        timeout=timeout,
    )
    return {(record["job_id"], record["lease_owner"]) for record in records}


async def release_job(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, *, retried: bool, timeout: float
) -> bool:
    """Gives the lease back (after a failure a later delivery may get past); `retried`
    counts a provider retry."""
    result = await conn.execute(
        """UPDATE image.jobs SET lease_owner = NULL, lease_until = NULL,
                  retry_count = retry_count + CASE WHEN $3 THEN 1 ELSE 0 END,
                  update_time = CASE WHEN $3 THEN clock_timestamp() ELSE update_time END
            WHERE job_id = $1 AND lease_owner = $2""",
        job_id,
        owner,
        retried,
        timeout=timeout,
    )
    return _updated(result) == 1


@dataclass(frozen=True)
class KeptPicture:
    slot: int
    png: bytes
    width: int
    height: int


async def keep_generated(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    owner: uuid.UUID,
    pictures: Sequence[KeptPicture],
    provider: str,
    cost_microdollars: int,
    *,
    start_uploading: bool = False,
    timeout: float,
) -> bool:
    """The provider's pictures kept (GENERATED), its name and cost added to the job, in one
    statement. Each kept slot is marked as one whose storage may be reserved from now on
    (reserved_bytes, what mark_reserving sets), so its upload needs no statement of its own
    first. `start_uploading` also makes the job UPLOADING (what start_uploading does), for a
    worker that holds every picture it is about to upload."""
    return bool(
        await conn.fetchval(
            f"""
            WITH job AS (
                UPDATE image.jobs SET provider = $3,
                       provider_cost_microdollars = provider_cost_microdollars + $4, update_time = clock_timestamp(),
                       status = CASE WHEN $9 THEN 'UPLOADING' ELSE status END,
                       start_time = CASE WHEN $9 THEN coalesce(start_time, clock_timestamp()) ELSE start_time END
                 WHERE job_id = $1 AND lease_owner = $2 AND status IN {_RUNNING_SQL}
                RETURNING job_id),
            kept AS (
                UPDATE image.job_images i
                   SET status = 'GENERATED', png = p.png, width = p.width, height = p.height,
                       content_type = 'image/png', size_bytes = length(p.png), reserved_bytes = length(p.png),
                       update_time = clock_timestamp()
                  FROM job, unnest($5::int[], $6::bytea[], $7::int[], $8::int[]) AS p(slot, png, width, height)
                 WHERE i.job_id = job.job_id AND i.slot = p.slot AND i.status = 'PENDING')
            SELECT count(*) = 1 FROM job
            """,
            job_id,
            owner,
            provider,
            cost_microdollars,
            [picture.slot for picture in pictures],
            [picture.png for picture in pictures],
            [picture.width for picture in pictures],
            [picture.height for picture in pictures],
            start_uploading,
            timeout=timeout,
        )
    )


async def fail_slots(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    owner: uuid.UUID,
    slots: Sequence[int] | None,
    error: str,
    *,
    refund: bool,
    timeout: float,
) -> bool:
    """`slots` (None: every open one) fail under our lease, owing their price back with `refund`."""
    async with conn.transaction():
        held = await conn.fetchval(
            f"SELECT true FROM image.jobs WHERE job_id = $1 AND lease_owner = $2 AND status IN {_RUNNING_SQL} FOR UPDATE",
            job_id,
            owner,
            timeout=timeout,
        )
        if not held:
            return False
        await _fail_open_slots(conn, job_id, error, refund=refund, slots=slots, timeout=timeout)
    return True


async def mark_reserving(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, slot: int, size: int, *, timeout: float
) -> bool:
    result = await conn.execute(
        f"""UPDATE image.job_images i SET reserved_bytes = $4 FROM image.jobs j
             WHERE i.job_id = $1 AND i.slot = $3 AND i.status = 'GENERATED' AND j.job_id = i.job_id
               AND j.lease_owner = $2 AND j.status IN {_RUNNING_SQL}""",
        job_id,
        owner,
        slot,
        size,
        timeout=timeout,
    )
    return _updated(result) == 1


async def mark_delivered(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, slot: int, storage_id: str, *, timeout: float
) -> bool:
    """The slot's object is in S3: DELIVERED, and the kept picture dropped, in one statement."""
    return bool(
        await conn.fetchval(
            f"""
            WITH job AS (
                UPDATE image.jobs SET update_time = clock_timestamp()
                 WHERE job_id = $1 AND lease_owner = $2 AND status IN {_RUNNING_SQL} RETURNING job_id),
            delivered AS (
                UPDATE image.job_images i SET status = 'DELIVERED', storage_id = $4, png = NULL,
                       update_time = clock_timestamp()
                  FROM job WHERE i.job_id = job.job_id AND i.slot = $3 AND i.status = 'GENERATED'
                RETURNING i.slot)
            SELECT count(*) = 1 FROM delivered
            """,
            job_id,
            owner,
            slot,
            storage_id,
            timeout=timeout,
        )
    )


@dataclass(frozen=True)
class FinishingJob:
    """A leased job as its worker is about to make it final: the row, its slots and the
    database's time, read in one statement."""

    row: JobRow
    slots: list[SlotRow]
    now: datetime


async def finishing_job(conn: asyncpg.Connection, job_id: uuid.UUID, *, timeout: float) -> FinishingJob | None:
    record = await conn.fetchrow(
        f"""SELECT {_JOB_COLUMNS}, clock_timestamp() AS now,
                   (SELECT array_agg(i ORDER BY i.slot) FROM image.job_images i WHERE i.job_id = j.job_id) AS slots
              FROM image.jobs j WHERE j.job_id = $1""",
        job_id,
        timeout=timeout,
    )
    if record is None:
        return None
    return FinishingJob(_job(record), [_slot(slot) for slot in record["slots"] or ()], record["now"])  # type: ignore[arg-type]


async def finish_job(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, *, read: FinishingJob, final: JobRow,
    announce: CompletedEvent, delivered: Sequence[SlotRow], timeout: float,
) -> JobRow | None:  # fmt: skip
    """`read` made `final` (COMPLETED or FAILED, complete_time = read.now) under our lease,
    which it releases, with its completion event, in one statement (so in one transaction).

    The event is encoded from `final` before the write, so the write only happens while the
    row is still the one `read` saw: under our lease (no one else changes a leased job; a
    cancel takes the lease, and then nothing is written here) and with the same update_time
    (every change but a lease renewal moves it). `delivered`: its DELIVERED slots from `read`."""
    return _job(
        await conn.fetchrow(
            f"""
            WITH finished AS (
                UPDATE image.jobs j
                   SET status = $3, error_message = $4, lease_owner = NULL, lease_until = NULL,
                       complete_time = $5, update_time = $5
                 WHERE j.job_id = $1 AND j.lease_owner = $2 AND j.status IN {_RUNNING_SQL} AND j.update_time = $6
                RETURNING {_JOB_COLUMNS}),
            queued AS (
                {_QUEUE_COMPLETED_SQL} SELECT job_id, $7, $8, $9 FROM finished ON CONFLICT (msg_id) DO NOTHING)
            SELECT * FROM finished
            """,
            job_id,
            owner,
            final.status.value,
            final.error_message,
            final.complete_time,
            read.row.update_time,
            JOB_COMPLETED_SUBJECT,
            job_completed_msg_id(job_id),
            announce(final, delivered),
            timeout=timeout,
        )
    )


async def start_abandoning(conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, *, timeout: float) -> bool:
    """A CHARGING intent whose create never came back, held under our lease: ABANDONING."""
    result = await conn.execute(
        """UPDATE image.jobs SET status = 'ABANDONING', update_time = clock_timestamp()
            WHERE job_id = $1 AND lease_owner = $2 AND status IN ('CHARGING', 'ABANDONING')""",
        job_id,
        owner,
        timeout=timeout,
    )
    return _updated(result) == 1


async def finish_abandoning(
    conn: asyncpg.Connection, job_id: uuid.UUID, owner: uuid.UUID, refunded: int, charge_id: str | None, *, timeout: float
) -> bool:
    result = await conn.execute(
        """UPDATE image.jobs SET status = 'ABANDONED', credits_refunded = $3, charge_id = $4, lease_owner = NULL,
                  lease_until = NULL, update_time = clock_timestamp()
            WHERE job_id = $1 AND lease_owner = $2 AND status = 'ABANDONING'""",
        job_id,
        owner,
        refunded,
        charge_id,
        timeout=timeout,
    )
    return _updated(result) == 1


async def forget_reservation(conn: asyncpg.Connection, job_id: uuid.UUID, slot: int, *, timeout: float) -> None:
    await conn.execute(
        "UPDATE image.job_images SET reserved_bytes = NULL WHERE job_id = $1 AND slot = $2 AND status = 'FAILED'",
        job_id,
        slot,
        timeout=timeout,
    )



# ---------------------------------------------------------------- the editor's jobs


@dataclass(frozen=True)
class StoredImage:
    """A delivered image of a job: what an edit starts from, or what an earlier turn made."""

    image_id: uuid.UUID
    job_id: uuid.UUID
    storage_id: str
    width: int
    height: int


_STORED_IMAGE = "i.image_id, i.job_id, i.storage_id, i.width, i.height"


def _stored(record: asyncpg.Record) -> StoredImage:
    return StoredImage(record["image_id"], record["job_id"], record["storage_id"], record["width"], record["height"])


async def user_image(conn: asyncpg.Connection, image_id: uuid.UUID, user_id: str, *, timeout: float) -> StoredImage | None:
    """One of the user's delivered images; None for any other (not theirs, deleted, not there)."""
    record = await conn.fetchrow(
        f"""SELECT {_STORED_IMAGE} FROM image.job_images i JOIN image.jobs j USING (job_id)
             WHERE i.image_id = $1 AND j.user_id = $2 AND i.status = 'DELIVERED'""",
        image_id,
        user_id,
        timeout=timeout,
    )
    return _stored(record) if record is not None else None


async def first_image(conn: asyncpg.Connection, job_id: uuid.UUID, *, timeout: float) -> StoredImage | None:
    """The job's first delivered image (the result an edit of the job continues from)."""
    record = await conn.fetchrow(
        f"""SELECT {_STORED_IMAGE} FROM image.job_images i
             WHERE i.job_id = $1 AND i.status = 'DELIVERED' ORDER BY i.slot LIMIT 1""",
        job_id,
        timeout=timeout,
    )
    return _stored(record) if record is not None else None


@dataclass(frozen=True)
class ChainTurn:
    """An earlier job of an edit chain, with the first image it delivered (if any)."""

    job_id: uuid.UUID
    prompt: str
    kind: str
    source_image_id: uuid.UUID | None
    result: StoredImage | None


async def chain_turns(
    conn: asyncpg.Connection, job_id: uuid.UUID, user_id: str, limit: int, *, timeout: float
) -> list[ChainTurn]:
    """The job's nearest `limit` ancestors (parent, grandparent...), oldest first."""
    records = await conn.fetch(
        f"""
        WITH RECURSIVE up AS (
            SELECT j.parent_job_id AS job_id, 1 AS distance FROM image.jobs j
             WHERE j.job_id = $1 AND j.parent_job_id IS NOT NULL
            UNION ALL
            SELECT p.parent_job_id, up.distance + 1 FROM up JOIN image.jobs p ON p.job_id = up.job_id
             WHERE p.parent_job_id IS NOT NULL AND up.distance < $3)
        SELECT j.job_id AS turn_job_id, j.prompt, j.kind, j.source_image_id, {_STORED_IMAGE}
          FROM up JOIN image.jobs j ON j.job_id = up.job_id AND j.user_id = $2
          LEFT JOIN LATERAL (
              SELECT {_STORED_IMAGE} FROM image.job_images i
               WHERE i.job_id = j.job_id AND i.status = 'DELIVERED' ORDER BY i.slot LIMIT 1) i ON true
         ORDER BY up.distance DESC
        """,
        job_id,
        user_id,
        limit,
        timeout=timeout,
    )
    return [
        ChainTurn(record["turn_job_id"], record["prompt"], record["kind"], record["source_image_id"],
                  _stored(record) if record["image_id"] is not None else None)  # fmt: skip
        for record in records
    ]


async def job_mask(conn: asyncpg.Connection, job_id: uuid.UUID, *, timeout: float) -> bytes | None:
    return await conn.fetchval("SELECT mask FROM image.jobs WHERE job_id = $1", job_id, timeout=timeout)

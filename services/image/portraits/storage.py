"""Plain SQL over asyncpg for portrait attempts; every function takes a connection.

Every write made under a lease names the lease owner, so a worker whose lease lapsed can
never overwrite the work of the one that took over (fencing).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg


class AttemptStatus(enum.StrEnum):
    PENDING = "PENDING"  # nothing kept yet
    GENERATED = "GENERATED"  # the picture is kept in image.portrait_results
    STORED = "STORED"  # the picture is in S3 under storage_id; the story not told yet
    READY = "READY"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


FINAL_STATUSES = frozenset({AttemptStatus.READY, AttemptStatus.SKIPPED, AttemptStatus.FAILED})
_FINAL_SQL = "('READY', 'SKIPPED', 'FAILED')"


@dataclass(frozen=True)
class PortraitClaim:
    status: AttemptStatus
    storage_id: str | None
    error: str | None
    deliveries: int
    create_time: datetime
    # False when another worker holds a live lease on this attempt.
    claimed: bool
    lease_seconds_left: float


_CLAIM_SQL = f"""
INSERT INTO image.portraits AS p (story_id, attempt, deliveries, lease_owner, lease_until)
VALUES ($1, $2, 1, $3, now() + make_interval(secs => $4))
ON CONFLICT (story_id, attempt) DO UPDATE SET
    deliveries = p.deliveries + 1,
    lease_owner = CASE WHEN p.status NOT IN {_FINAL_SQL}
                        AND (p.lease_until IS NULL OR p.lease_until < now())
                       THEN excluded.lease_owner ELSE p.lease_owner END,
    lease_until = CASE WHEN p.status NOT IN {_FINAL_SQL}
                        AND (p.lease_until IS NULL OR p.lease_until < now())
                       THEN excluded.lease_until ELSE p.lease_until END
RETURNING status, storage_id, error, deliveries, create_time,
          lease_owner IS NOT DISTINCT FROM $3 AS claimed,
          coalesce(extract(epoch FROM lease_until - now()), 0)::float8 AS lease_seconds_left
"""


async def claim_portrait(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    lease_seconds: float,
    *,
    timeout: float,
) -> PortraitClaim:
    """Counts a delivery and takes the lease unless the attempt is final or leased."""
    row = await conn.fetchrow(_CLAIM_SQL, story_id, attempt, lease_owner, lease_seconds, timeout=timeout)
    status = AttemptStatus(row["status"])
    return PortraitClaim(
        status=status,
        storage_id=row["storage_id"],
        error=row["error"],
        deliveries=row["deliveries"],
        create_time=row["create_time"],
        claimed=row["claimed"] and status not in FINAL_STATUSES,
        lease_seconds_left=max(row["lease_seconds_left"], 0.0),
    )


async def renew_lease(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    lease_seconds: float,
    *,
    timeout: float,
) -> bool:
    """Pushes our lease to now + lease_seconds; False once it is no longer ours."""
    # update_time is left alone: a renewal is not a change of the portrait.
    result = await conn.execute(
        """
        UPDATE image.portraits
           SET lease_until = now() + make_interval(secs => $4)
         WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3
        """,
        story_id,
        attempt,
        lease_owner,
        lease_seconds,
        timeout=timeout,
    )
    return _updated_one(result)


_KEEP_GENERATED_SQL = """
WITH generated AS (
    UPDATE image.portraits SET status = 'GENERATED', error = NULL, update_time = now()
     WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3 AND status = 'PENDING'
    RETURNING story_id, attempt
), kept AS (
    INSERT INTO image.portrait_results (story_id, attempt, png)
    SELECT story_id, attempt, $4 FROM generated
    ON CONFLICT (story_id, attempt) DO UPDATE SET png = excluded.png
)
SELECT count(*) FROM generated
"""


async def keep_generated(
    conn: asyncpg.Connection, story_id: uuid.UUID, attempt: int, lease_owner: uuid.UUID, png: bytes, *, timeout: float
) -> bool:
    """Keeps the generated PNG and marks the attempt GENERATED: one statement, so both or
    neither (and one round trip, where a transaction took four)."""
    return await conn.fetchval(_KEEP_GENERATED_SQL, story_id, attempt, lease_owner, png, timeout=timeout) == 1


async def kept_png(conn: asyncpg.Connection, story_id: uuid.UUID, attempt: int, *, timeout: float) -> bytes | None:
    return await conn.fetchval(
        "SELECT png FROM image.portrait_results WHERE story_id = $1 AND attempt = $2",
        story_id,
        attempt,
        timeout=timeout,
    )


_MARK_STORED_SQL = """
WITH stored AS (
    UPDATE image.portraits
       SET status = 'STORED', storage_id = $4, error = NULL, update_time = now()
     WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3
       AND status IN ('PENDING', 'GENERATED', 'STORED')
    RETURNING story_id, attempt
), dropped AS (
    DELETE FROM image.portrait_results AS r USING stored
     WHERE r.story_id = stored.story_id AND r.attempt = stored.attempt
)
SELECT count(*) FROM stored
"""


async def mark_stored(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    storage_id: str,
    *,
    timeout: float,
) -> bool:
    """The object is in S3: STORED, and the kept copy (if any: a picture that went up at
    once was never kept) is dropped, in one statement."""
    return await conn.fetchval(_MARK_STORED_SQL, story_id, attempt, lease_owner, storage_id, timeout=timeout) == 1


async def mark_final(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    status: AttemptStatus,
    error: str | None,
    storage_id: str | None = None,
    *,
    timeout: float,
) -> bool:
    """READY, SKIPPED or FAILED; releases the lease. `storage_id`, when given, records the
    object the attempt put in S3 (READY straight from PENDING skips STORED)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"{status!r} is not a final portrait status")
    result = await conn.execute(
        """
        UPDATE image.portraits
           SET status = $4, error = $5, storage_id = coalesce($6, storage_id),
               lease_owner = NULL, lease_until = NULL, update_time = now()
         WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3
        """,
        story_id,
        attempt,
        lease_owner,
        status.value,
        error,
        storage_id,
        timeout=timeout,
    )
    return _updated_one(result)


async def release_portrait(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    error: str | None,
    *,
    timeout: float,
) -> bool:
    """Gives the lease back after a failure that a later delivery may get past."""
    result = await conn.execute(
        """
        UPDATE image.portraits
           SET error = $4, lease_owner = NULL, lease_until = NULL, update_time = now()
         WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3
        """,
        story_id,
        attempt,
        lease_owner,
        error,
        timeout=timeout,
    )
    return _updated_one(result)


def _updated_one(command_tag: str) -> bool:
    # asyncpg returns the command tag, e.g. "UPDATE 1".
    return command_tag.rsplit(" ", 1)[-1] == "1"

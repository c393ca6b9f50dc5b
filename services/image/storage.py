"""Plain SQL over asyncpg for the image schema; every function takes a connection."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

FINAL_STATUSES = frozenset({"READY", "SKIPPED", "FAILED"})


@dataclass(frozen=True)
class PortraitClaim:
    status: str
    storage_id: str | None
    deliveries: int
    # False when another worker holds a live lease on this attempt.
    claimed: bool


_CLAIM_SQL = """
INSERT INTO image.portraits AS p (story_id, attempt, deliveries, lease_owner, lease_until)
VALUES ($1, $2, 1, $3, now() + make_interval(secs => $4))
ON CONFLICT (story_id, attempt) DO UPDATE SET
    deliveries = p.deliveries + 1,
    update_time = now(),
    lease_owner = CASE WHEN p.status NOT IN ('READY', 'SKIPPED', 'FAILED')
                        AND (p.lease_until IS NULL OR p.lease_until < now())
                       THEN excluded.lease_owner ELSE p.lease_owner END,
    lease_until = CASE WHEN p.status NOT IN ('READY', 'SKIPPED', 'FAILED')
                        AND (p.lease_until IS NULL OR p.lease_until < now())
                       THEN excluded.lease_until ELSE p.lease_until END
RETURNING status, storage_id, deliveries, lease_owner IS NOT DISTINCT FROM $3 AS claimed
"""


async def claim_portrait(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    lease_seconds: float,
) -> PortraitClaim:
    """Counts a delivery and takes the lease unless the attempt is final or leased."""
    row = await conn.fetchrow(_CLAIM_SQL, story_id, attempt, lease_owner, lease_seconds)
    claimed = row["claimed"] and row["status"] not in FINAL_STATUSES
    return PortraitClaim(row["status"], row["storage_id"], row["deliveries"], claimed)


async def renew_lease(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    lease_seconds: float,
) -> bool:
    """Pushes our lease to now + lease_seconds; False once it is no longer ours."""
    # update_time is left alone: a heartbeat is not a change of the portrait.
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
    )
    return _updated_one(result)


async def mark_stored(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    storage_id: str,
) -> bool:
    result = await conn.execute(
        """
        UPDATE image.portraits
           SET status = 'STORED', storage_id = $4, error = NULL, update_time = now()
         WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3
           AND status IN ('PENDING', 'STORED')
        """,
        story_id,
        attempt,
        lease_owner,
        storage_id,
    )
    return _updated_one(result)


async def mark_final(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    status: str,
    error: str | None,
) -> bool:
    """READY, SKIPPED or FAILED; releases the lease."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"{status!r} is not a final portrait status")
    result = await conn.execute(
        """
        UPDATE image.portraits
           SET status = $4, error = $5, lease_owner = NULL, lease_until = NULL,
               update_time = now()
         WHERE story_id = $1 AND attempt = $2 AND lease_owner = $3
        """,
        story_id,
        attempt,
        lease_owner,
        status,
        error,
    )
    return _updated_one(result)


async def release_portrait(
    conn: asyncpg.Connection,
    story_id: uuid.UUID,
    attempt: int,
    lease_owner: uuid.UUID,
    error: str | None,
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
    )
    return _updated_one(result)


@dataclass(frozen=True)
class PortraitRecord:
    story_id: uuid.UUID
    attempt: int
    status: str
    storage_id: str | None
    error: str | None
    deliveries: int


async def get_portrait(
    conn: asyncpg.Connection, story_id: uuid.UUID, attempt: int
) -> PortraitRecord | None:
    row = await conn.fetchrow(
        """
        SELECT story_id, attempt, status, storage_id, error, deliveries
          FROM image.portraits
         WHERE story_id = $1 AND attempt = $2
        """,
        story_id,
        attempt,
    )
    return None if row is None else PortraitRecord(**dict(row))


def _updated_one(command_tag: str) -> bool:
    # asyncpg returns the command tag, e.g. "UPDATE 1".
    return command_tag.rsplit(" ", 1)[-1] == "1"

"""Plain SQL for stories and their outbox; every function takes a connection.

The caller owns the transaction. `domain` is imported as a module (not its names) because
domain also calls into this module.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime

import asyncpg

from services.story import domain

_STORY_COLUMNS = """
    story_id::text AS story_id, user_id, title, patient, chapters, image_generation_prompt,
    storage_id, portrait_status, portrait_error, portrait_attempt, create_time, update_time
"""


def _story_from_row(row: asyncpg.Record) -> domain.Story:
    patient = json.loads(row["patient"])
    return domain.Story(
        story_id=row["story_id"],
        user_id=row["user_id"],
        content=domain.StoryContent(
            title=row["title"],
            patient=domain.Patient(**patient),
            chapters=tuple(domain.Chapter(**chapter) for chapter in json.loads(row["chapters"])),
            image_generation_prompt=row["image_generation_prompt"],
        ),
        storage_id=row["storage_id"] or "",
        portrait_status=domain.PortraitStatus(row["portrait_status"]),
        portrait_error=row["portrait_error"],
        portrait_attempt=row["portrait_attempt"],
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


def _maybe_story(row: asyncpg.Record | None) -> domain.Story | None:
    return _story_from_row(row) if row is not None else None


async def insert_story(
    conn: asyncpg.Connection, story_id: str, user_id: str, request_id: str | None, content: domain.StoryContent
) -> domain.Story | None:
    """Inserts a PENDING story; None when (user_id, request_id) already made one."""
    patient = content.patient
    assert patient is not None, "validated content always has a patient"
    row = await conn.fetchrow(
        f"""
        INSERT INTO story.stories
            (story_id, user_id, request_id, title, patient, chapters, image_generation_prompt)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (user_id, request_id) DO NOTHING
        RETURNING {_STORY_COLUMNS}
        """,
        story_id,
        user_id,
        request_id,
        content.title,
        json.dumps(
            {"name": patient.name, "age": patient.age, "diagnosis": patient.diagnosis, "appearance": patient.appearance}
        ),
        json.dumps([{"title": c.title, "text": c.text} for c in content.chapters]),
        content.image_generation_prompt,
    )
    return _maybe_story(row)


async def insert_outbox_event(conn: asyncpg.Connection, story_id: str, portrait_attempt: int) -> None:
    """Queues `story.created`; the message id makes a second publish of it a no-op."""
    await conn.execute(
        """
        INSERT INTO story.outbox (story_id, portrait_attempt, subject, msg_id)
        VALUES ($1, $2, 'story.created', $3)
        ON CONFLICT (msg_id) DO NOTHING
        """,
        story_id,
        portrait_attempt,
        f"story.created:{story_id}:{portrait_attempt}",
    )


async def find_by_request(conn: asyncpg.Connection, user_id: str, request_id: str | None) -> domain.Story | None:
    row = await conn.fetchrow(
        f"SELECT {_STORY_COLUMNS} FROM story.stories WHERE user_id = $1 AND request_id = $2",
        user_id,
        request_id,
    )
    return _maybe_story(row)


async def get_story(conn: asyncpg.Connection, story_id: str, *, for_update: bool = False) -> domain.Story | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_STORY_COLUMNS} FROM story.stories WHERE story_id = $1{lock}", story_id)
    return _maybe_story(row)


async def list_stories(
    conn: asyncpg.Connection, user_id: str, limit: int, after: tuple[datetime, str] | None
) -> list[domain.Story]:
    """Newest first; keyset pagination on (create_time, story_id) so pages never skip or repeat."""
    if after is None:
        rows = await conn.fetch(
            f"""SELECT {_STORY_COLUMNS} FROM story.stories WHERE user_id = $1
                ORDER BY create_time DESC, story_id DESC LIMIT $2""",
            user_id,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"""SELECT {_STORY_COLUMNS} FROM story.stories
                WHERE user_id = $1 AND (create_time, story_id) < ($2, $3::uuid)
                ORDER BY create_time DESC, story_id DESC LIMIT $4""",
            user_id,
            after[0],
            after[1],
            limit,
        )
    return [_story_from_row(row) for row in rows]


def encode_page_token(last: domain.Story) -> str:
    raw = json.dumps([last.create_time.isoformat(), last.story_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_page_token(token: str) -> tuple[datetime, str] | None:
    try:
        create_time, story_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(create_time), str(domain.validate_story_id(story_id))
    except (ValueError, TypeError, domain.InvalidArgument):
        return None


async def attach_portrait(conn: asyncpg.Connection, story_id: str, storage_id: str) -> domain.Story | None:
    """Marks the portrait READY; None when nothing changed (already so) or no such story."""
    row = await conn.fetchrow(
        f"""
        UPDATE story.stories
        SET storage_id = $2, portrait_status = 'READY', portrait_error = '', update_time = now()
        WHERE story_id = $1 AND (portrait_status <> 'READY' OR storage_id IS DISTINCT FROM $2)
        RETURNING {_STORY_COLUMNS}
        """,
        story_id,
        storage_id,
    )
    return _maybe_story(row)


async def end_portrait(conn: asyncpg.Connection, story_id: str, status: str, reason: str) -> domain.Story | None:
    """FAILED or SKIPPED with a reason; None when nothing changed or no such story."""
    row = await conn.fetchrow(
        f"""
        UPDATE story.stories
        SET portrait_status = $2, portrait_error = $3, update_time = now()
        WHERE story_id = $1 AND portrait_status <> 'READY'
          AND (portrait_status <> $2 OR portrait_error <> $3)
        RETURNING {_STORY_COLUMNS}
        """,
        story_id,
        status,
        reason,
    )
    return _maybe_story(row)


async def restart_portrait(conn: asyncpg.Connection, story_id: str) -> domain.Story:
    row = await conn.fetchrow(
        f"""
        UPDATE story.stories
        SET portrait_status = 'PENDING', portrait_error = '', portrait_attempt = portrait_attempt + 1,
            update_time = now()
        WHERE story_id = $1
        RETURNING {_STORY_COLUMNS}
        """,
        story_id,
    )
    return _story_from_row(row)


async def story_update_time(conn: asyncpg.Connection, story_id: str) -> datetime | None:
    return await conn.fetchval("SELECT update_time FROM story.stories WHERE story_id = $1", story_id)


# --- outbox relay -------------------------------------------------------------------------


async def claim_unpublished(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Locks a batch of unpublished events; SKIP LOCKED lets several relays share the work."""
    return await conn.fetch(
        """
        SELECT o.outbox_id, o.subject, o.msg_id, o.portrait_attempt,
               s.story_id::text AS story_id, s.user_id, s.image_generation_prompt, s.create_time
        FROM story.outbox o JOIN story.stories s USING (story_id)
        WHERE o.published_at IS NULL
        ORDER BY o.outbox_id
        LIMIT $1
        FOR UPDATE OF o SKIP LOCKED
        """,
        limit,
    )


async def mark_published(conn: asyncpg.Connection, outbox_id: int) -> None:
    await conn.execute(
        "UPDATE story.outbox SET published_at = now(), attempts = attempts + 1, last_error = NULL WHERE outbox_id = $1",
        outbox_id,
    )


async def record_publish_failure(conn: asyncpg.Connection, outbox_id: int, error: str) -> None:
    await conn.execute(
        "UPDATE story.outbox SET attempts = attempts + 1, last_error = $2 WHERE outbox_id = $1",
        outbox_id,
        error[:1000],
    )

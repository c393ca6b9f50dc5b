"""Plain SQL for stories and their outbox; every function takes a connection.

The caller owns the transaction. Rows come back as the plain data of services.story.model.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict

import asyncpg

from services.story import model
from services.story.difficulty import story_typing_difficulty
from services.story.events import encode_story_created, story_created_msg_id
from shared.outbox import OutboxRow
from shared.streams import STORY_CREATED_SUBJECT

# Every statement is bounded: a slow database shows as UNAVAILABLE, not as a hung call.
STATEMENT_TIMEOUT_SECONDS = 10.0

_COLUMNS = (
    "user_id", "title", "patient", "chapters", "image_generation_prompt", "storage_id", "portrait_status",
    "portrait_error", "portrait_attempt", "create_time", "update_time", "patient_gender", "admission_date",
    "typing_difficulty", "theme", "writer", "writer_model",
)  # fmt: skip
_STORY_COLUMNS = ", ".join(["story_id::text AS story_id", *_COLUMNS])
_STORY_COLUMNS_OF_S = ", ".join(["s.story_id::text AS story_id", *(f"s.{column}" for column in _COLUMNS)])
# GetStory's one statement (also what tests/bench/select_server.py measures as the ceiling).
GET_STORY_SQL = f"SELECT {_STORY_COLUMNS} FROM story.stories WHERE story_id = $1"
# GetStory calls coalesced (shared/coalescing.py): any number of ids, one round trip.
GET_STORIES_SQL = f"SELECT {_STORY_COLUMNS} FROM story.stories WHERE story_id = ANY($1::uuid[])"


def _story_from_row(row: asyncpg.Record) -> model.Story:
    """A story of any age: rows written before migration 0003 have NULL or '' in its columns."""
    patient = json.loads(row["patient"])
    gender = row["patient_gender"]
    content = model.StoryContent(
        title=row["title"],
        patient=model.Patient(
            name=patient["name"],
            age=patient["age"],
            diagnosis=patient["diagnosis"],
            appearance=patient["appearance"],
            gender=model.Gender(gender) if gender is not None else None,
            admission_date=row["admission_date"],
        ),
        chapters=tuple(model.Chapter(title=c["title"], text=c["text"]) for c in json.loads(row["chapters"])),
        image_generation_prompt=row["image_generation_prompt"],
    )
    difficulty = row["typing_difficulty"]
    return model.Story(
        story_id=row["story_id"],
        user_id=row["user_id"],
        content=content,
        storage_id=row["storage_id"] or "",
        portrait_status=model.PortraitStatus(row["portrait_status"]),
        portrait_error=row["portrait_error"],
        portrait_attempt=row["portrait_attempt"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        typing_difficulty=(
            difficulty if difficulty is not None else story_typing_difficulty(content.title, content.chapters)
        ),
        authorship=model.Authorship(writer=row["writer"], model=row["writer_model"], theme=row["theme"]),
    )


def _maybe_story(row: asyncpg.Record | None) -> model.Story | None:
    return _story_from_row(row) if row is not None else None


async def insert_story(
    conn: asyncpg.Connection,
    story_id: str,
    user_id: str,
    request_id: str | None,
    content: model.StoryContent,
    *,
    typing_difficulty: int,
    authorship: model.Authorship,
    request_digest: str | None = None,
) -> model.Story | None:
    """Inserts a PENDING story; None when (user_id, request_id) already made one."""
    patient = content.patient
    assert patient is not None and patient.gender is not None, "validated content always has a whole patient"
    row = await conn.fetchrow(
        f"""
        INSERT INTO story.stories
            (story_id, user_id, request_id, title, patient, chapters, image_generation_prompt,
             patient_gender, admission_date, typing_difficulty, theme, writer, writer_model, request_digest)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
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
        patient.gender.value,
        patient.admission_date,
        typing_difficulty,
        authorship.theme,
        authorship.writer,
        authorship.model,
        request_digest,
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    return _maybe_story(row)


async def insert_outbox_event(
    conn: asyncpg.Connection, story: model.Story, *, claim_seconds: float | None = None
) -> OutboxRow | None:
    """Queues `story.created` for the story's current attempt; the message id makes a
    second publish of it a no-op. With `claim_seconds` the row is inserted claimed for the
    handoff (shared/outbox.py) and returned; None when the attempt's event was queued already."""
    row = await conn.fetchrow(
        """
        INSERT INTO story.outbox (story_id, portrait_attempt, subject, msg_id, payload, claimed_until)
        VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6::float8))
        ON CONFLICT (msg_id) DO NOTHING
        RETURNING outbox_id, subject, msg_id, payload, created_at
        """,
        story.story_id,
        story.portrait_attempt,
        STORY_CREATED_SUBJECT,
        story_created_msg_id(story.story_id, story.portrait_attempt),
        encode_story_created(story),
        claim_seconds,
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    if row is None:
        return None
    return OutboxRow(**dict(row), log_ids={"story_id": story.story_id, "attempt": story.portrait_attempt})


async def fill_missing_payloads(conn: asyncpg.Connection) -> int:
    """Rows queued before the outbox stored payloads get theirs; returns how many."""
    rows = await conn.fetch(
        f"""SELECT o.outbox_id, o.portrait_attempt AS event_attempt, {_STORY_COLUMNS_OF_S}
              FROM story.outbox o JOIN story.stories s USING (story_id)
             WHERE o.payload IS NULL AND o.published_at IS NULL""",
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    for row in rows:
        # The event of the row's own attempt, which may be older than the story's current one.
        story = dataclasses.replace(_story_from_row(row), portrait_attempt=row["event_attempt"])
        await conn.execute(
            "UPDATE story.outbox SET payload = $2 WHERE outbox_id = $1",
            row["outbox_id"],
            encode_story_created(story),
            timeout=STATEMENT_TIMEOUT_SECONDS,
        )
    return len(rows)


async def find_by_request(
    conn: asyncpg.Connection, user_id: str, request_id: str | None
) -> tuple[model.Story, str | None] | None:
    """The story (user_id, request_id) made, with the digest of what it was asked with."""
    row = await conn.fetchrow(
        f"SELECT {_STORY_COLUMNS}, request_digest FROM story.stories WHERE user_id = $1 AND request_id = $2",
        user_id,
        request_id,
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    return None if row is None else (_story_from_row(row), row["request_digest"])


async def get_story(conn: asyncpg.Connection, story_id: str, *, for_update: bool = False) -> model.Story | None:
    row = await conn.fetchrow(
        GET_STORY_SQL + " FOR UPDATE" if for_update else GET_STORY_SQL,
        story_id,
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    return _maybe_story(row)


class DecodedStories:
    """The story last decoded from each story's row, handed out again while a row read
    later holds the very same values (compared in full, so nothing can be stale): polled
    stories (GetStory, WatchStory) skip two json.loads and the model's dataclasses, about
    a tenth of a GetStory's CPU in the service. Holds at most `max_stories`, least
    recently read dropped first."""

    def __init__(self, max_stories: int = 1024) -> None:
        self._max_stories = max_stories
        self._known: OrderedDict[str, tuple[asyncpg.Record, model.Story]] = OrderedDict()

    def story(self, row: asyncpg.Record) -> model.Story:
        story_id = row["story_id"]
        known = self._known.get(story_id)
        if known is not None and known[0] == row:
            self._known.move_to_end(story_id)
            return known[1]
        story = _story_from_row(row)
        self._known[story_id] = (row, story)
        self._known.move_to_end(story_id)
        if len(self._known) > self._max_stories:
            self._known.popitem(last=False)
        return story


async def get_stories(
    conn: asyncpg.Connection, story_ids: list[str], decoded: DecodedStories | None = None
) -> dict[str, model.Story]:
    """The stories of `story_ids` that exist, by id (ids in the canonical UUID spelling)."""
    decode = decoded.story if decoded is not None else _story_from_row
    if len(story_ids) == 1:
        # Most batches hold one id: the plain key lookup costs the client and PostgreSQL
        # less than encoding and scanning a one-element array.
        row = await conn.fetchrow(GET_STORY_SQL, story_ids[0], timeout=STATEMENT_TIMEOUT_SECONDS)
        return {row["story_id"]: decode(row)} if row is not None else {}
    rows = await conn.fetch(GET_STORIES_SQL, story_ids, timeout=STATEMENT_TIMEOUT_SECONDS)
    return {row["story_id"]: decode(row) for row in rows}


async def list_stories(
    conn: asyncpg.Connection, user_id: str, limit: int, after: model.PageCursor | None
) -> list[model.Story]:
    """Newest first; keyset pagination on (create_time, story_id) so pages never skip or repeat."""
    if after is None:
        rows = await conn.fetch(
            f"""SELECT {_STORY_COLUMNS} FROM story.stories WHERE user_id = $1
                ORDER BY create_time DESC, story_id DESC LIMIT $2""",
            user_id,
            limit,
            timeout=STATEMENT_TIMEOUT_SECONDS,
        )
    else:
        rows = await conn.fetch(
            f"""SELECT {_STORY_COLUMNS} FROM story.stories
                WHERE user_id = $1 AND (create_time, story_id) < ($2, $3::uuid)
                ORDER BY create_time DESC, story_id DESC LIMIT $4""",
            user_id,
            after.create_time,
            after.story_id,
            limit,
            timeout=STATEMENT_TIMEOUT_SECONDS,
        )
    return [_story_from_row(row) for row in rows]


# SetStoryImage in one statement (one round trip, no BEGIN and COMMIT of their own): the row
# locked, then marked READY with its object only if `attempt` is its current attempt and
# still open. Either way the answer is the row as it is now, and whether this attached it.
_FINAL_PORTRAIT_STATUSES_SQL = ", ".join(sorted(f"'{status.value}'" for status in model.FINAL_PORTRAIT_STATUSES))
_ATTACH_PORTRAIT_SQL = f"""
WITH current AS (
    SELECT {_STORY_COLUMNS} FROM story.stories WHERE story_id = $1 FOR UPDATE
),
attached AS (
    UPDATE story.stories AS s
    SET storage_id = $2, portrait_status = 'READY', portrait_error = '', update_time = clock_timestamp()
    FROM current
    WHERE s.story_id = $1 AND current.portrait_attempt = $3
      AND current.portrait_status NOT IN ({_FINAL_PORTRAIT_STATUSES_SQL})
    RETURNING {_STORY_COLUMNS_OF_S}
)
SELECT true AS attached, * FROM attached
UNION ALL
SELECT false, * FROM current WHERE NOT EXISTS (SELECT FROM attached)
"""


async def attach_portrait(
    conn: asyncpg.Connection, story_id: str, storage_id: str, attempt: int
) -> tuple[model.Story, bool] | None:
    """Marks the portrait of `attempt` READY with its object if that attempt is current and
    open: (the story now, whether this call attached it); None when there is no story."""
    row = await conn.fetchrow(_ATTACH_PORTRAIT_SQL, story_id, storage_id, attempt, timeout=STATEMENT_TIMEOUT_SECONDS)
    if row is None:
        return None
    return _story_from_row(row), row["attached"]


async def end_portrait(conn: asyncpg.Connection, story_id: str, status: str, reason: str) -> model.Story:
    """FAILED or SKIPPED with a reason; the caller checked the attempt and the status."""
    row = await conn.fetchrow(
        f"""
        UPDATE story.stories
        SET portrait_status = $2, portrait_error = $3, update_time = clock_timestamp()
        WHERE story_id = $1
        RETURNING {_STORY_COLUMNS}
        """,
        story_id,
        status,
        reason,
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    return _story_from_row(row)


async def restart_portrait(conn: asyncpg.Connection, story_id: str) -> model.Story:
    row = await conn.fetchrow(
        f"""
        UPDATE story.stories
        SET portrait_status = 'PENDING', portrait_error = '', portrait_attempt = portrait_attempt + 1,
            update_time = clock_timestamp()
        WHERE story_id = $1
        RETURNING {_STORY_COLUMNS}
        """,
        story_id,
        timeout=STATEMENT_TIMEOUT_SECONDS,
    )
    return _story_from_row(row)

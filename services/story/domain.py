"""Stories: what a valid case file is, and the use cases that write and change them.

No gRPC, no SQL text, no HTTP here: storage functions and the writer come in as arguments.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from services.story import storage
from services.story.writers.base import StoryWriter, WriterError

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 128
MAX_THEME_LENGTH = 500
MAX_STORAGE_ID_LENGTH = 1024
MAX_REASON_LENGTH = 1000
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


class DomainError(Exception):
    """A request the story service refuses; the handlers map each subclass to a status code."""


class InvalidArgument(DomainError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class WriterUnavailable(DomainError):
    """The writer model failed or wrote something unusable; nothing was stored."""


class PortraitStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


FINAL_PORTRAIT_STATUSES = frozenset({PortraitStatus.READY, PortraitStatus.FAILED, PortraitStatus.SKIPPED})


@dataclass(frozen=True)
class Patient:
    name: str
    age: int
    diagnosis: str
    appearance: str


@dataclass(frozen=True)
class Chapter:
    title: str
    text: str


@dataclass(frozen=True)
class StoryContent:
    title: str
    patient: Patient | None
    chapters: tuple[Chapter, ...]
    image_generation_prompt: str


@dataclass(frozen=True)
class Story:
    story_id: str
    user_id: str
    content: StoryContent
    storage_id: str
    portrait_status: PortraitStatus
    portrait_error: str
    portrait_attempt: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class StoryPage:
    stories: list[Story]
    next_page_token: str


# --- validation -------------------------------------------------------------------------


def _require_text(field: str, value: str, max_length: int) -> str:
    if not value or not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(field, f"must be at most {max_length} characters")
    return value.strip()


def validate_user_id(user_id: str) -> str:
    return _require_text("user_id", user_id, MAX_ID_LENGTH)


def validate_request_id(request_id: str) -> str | None:
    """An empty request_id means the caller wants no idempotency."""
    if len(request_id) > MAX_ID_LENGTH:
        raise InvalidArgument("request_id", f"must be at most {MAX_ID_LENGTH} characters")
    return request_id.strip() or None


def validate_story_id(story_id: str) -> str:
    if not story_id:
        raise InvalidArgument("story_id", "must not be empty")
    try:
        return str(uuid.UUID(story_id))
    except ValueError:
        raise InvalidArgument("story_id", "must be a UUID") from None


def validate_content(content: StoryContent, prefix: str = "content") -> StoryContent:
    """Checks every field of a case file; the error names the first bad one."""
    title = _require_text(f"{prefix}.title", content.title, 200)
    if content.patient is None:
        raise InvalidArgument(f"{prefix}.patient", "is required")
    patient = _validate_patient(content.patient, f"{prefix}.patient")
    if not content.chapters:
        raise InvalidArgument(f"{prefix}.chapters", "must have at least one chapter")
    if len(content.chapters) > 20:
        raise InvalidArgument(f"{prefix}.chapters", "must have at most 20 chapters")
    chapters = tuple(
        Chapter(
            title=_require_text(f"{prefix}.chapters[{i}].title", chapter.title, 200),
            text=_require_text(f"{prefix}.chapters[{i}].text", chapter.text, 20_000),
        )
        for i, chapter in enumerate(content.chapters)
    )
    prompt = content.image_generation_prompt
    if len(prompt) > 4000:
        raise InvalidArgument(f"{prefix}.image_generation_prompt", "must be at most 4000 characters")
    # A blank prompt is allowed: the image service marks such a portrait SKIPPED.
    return StoryContent(title=title, patient=patient, chapters=chapters, image_generation_prompt=prompt.strip())


def _validate_patient(patient: Patient, prefix: str) -> Patient:
    if not 0 <= patient.age <= 130:
        raise InvalidArgument(f"{prefix}.age", "must be between 0 and 130")
    return Patient(
        name=_require_text(f"{prefix}.name", patient.name, 200),
        age=patient.age,
        diagnosis=_require_text(f"{prefix}.diagnosis", patient.diagnosis, 500),
        appearance=_require_text(f"{prefix}.appearance", patient.appearance, 2000),
    )


def content_from_writer(draft: Mapping[str, Any]) -> StoryContent:
    """Reads the writer's JSON object; a shape error is the writer's fault, not the caller's."""
    try:
        patient = draft["patient"]
        content = StoryContent(
            title=str(draft["title"]),
            patient=Patient(
                name=str(patient["name"]),
                age=int(patient["age"]),
                diagnosis=str(patient["diagnosis"]),
                appearance=str(patient["appearance"]),
            ),
            chapters=tuple(Chapter(title=str(c["title"]), text=str(c["text"])) for c in draft["chapters"]),
            image_generation_prompt=str(draft.get("image_generation_prompt") or ""),
        )
        return validate_content(content, prefix="story")
    except (KeyError, TypeError, ValueError, InvalidArgument) as error:
        raise WriterUnavailable(f"the writer returned an unusable story: {error}") from None


# --- use cases --------------------------------------------------------------------------


async def create_story(
    pool: asyncpg.Pool, *, user_id: str, content: StoryContent, request_id: str, on_committed: Callable[[], None] | None = None
) -> Story:
    """Stores a caller-written story and its `story.created` outbox row in one transaction."""
    user_id = validate_user_id(user_id)
    request_key = validate_request_id(request_id)
    content = validate_content(content)
    return await _store_new_story(pool, user_id=user_id, content=content, request_key=request_key, on_committed=on_committed)


async def generate_story(
    pool: asyncpg.Pool,
    writer: StoryWriter,
    *,
    user_id: str,
    theme: str,
    request_id: str,
    on_committed: Callable[[], None] | None = None,
) -> Story:
    """Asks the writer for a story, then stores it like create_story."""
    user_id = validate_user_id(user_id)
    request_key = validate_request_id(request_id)
    if len(theme) > MAX_THEME_LENGTH:
        raise InvalidArgument("theme", f"must be at most {MAX_THEME_LENGTH} characters")
    if request_key is not None:
        async with pool.acquire() as conn:
            existing = await storage.find_by_request(conn, user_id, request_key)
        if existing is not None:
            return existing
    story_id = str(uuid.uuid4())
    log.info("story.write_started", extra={"story_id": story_id, "user_id": user_id, "writer": writer.name})
    try:
        draft = await writer.write(theme=theme.strip() or None, seed=f"{user_id}\x00{request_key or story_id}")
    except WriterError as error:
        log.warning("story.write_failed", extra={"story_id": story_id, "user_id": user_id, "error": str(error)})
        raise WriterUnavailable(f"the story writer failed: {error}") from None
    content = content_from_writer(draft)
    return await _store_new_story(
        pool, user_id=user_id, content=content, request_key=request_key, story_id=story_id, on_committed=on_committed
    )


async def _store_new_story(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    content: StoryContent,
    request_key: str | None,
    story_id: str | None = None,
    on_committed: Callable[[], None] | None = None,
) -> Story:
    story_id = story_id or str(uuid.uuid4())
    async with pool.acquire() as conn:
        async with conn.transaction():
            story = await storage.insert_story(conn, story_id, user_id, request_key, content)
            if story is None:
                # The same request_id already made a story: answer with it, write nothing.
                existing = await storage.find_by_request(conn, user_id, request_key)
                assert existing is not None, "insert conflicted, so the row exists"
                return existing
            await storage.insert_outbox_event(conn, story.story_id, story.portrait_attempt)
    log.info("story.created", extra={"story_id": story.story_id, "user_id": user_id})
    if on_committed is not None:
        on_committed()
    return story


async def get_story(pool: asyncpg.Pool, story_id: str) -> Story:
    story_id = validate_story_id(story_id)
    async with pool.acquire() as conn:
        story = await storage.get_story(conn, story_id)
    if story is None:
        raise NotFound(f"story_id: no story {story_id}")
    return story


async def list_stories(pool: asyncpg.Pool, *, user_id: str, page_size: int, page_token: str) -> StoryPage:
    user_id = validate_user_id(user_id)
    if page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = storage.decode_page_token(page_token) if page_token else None
    if page_token and after is None:
        raise InvalidArgument("page_token", "is not a token this method returned")
    async with pool.acquire() as conn:
        stories = await storage.list_stories(conn, user_id, limit + 1, after)
    next_token = storage.encode_page_token(stories[limit - 1]) if len(stories) > limit else ""
    return StoryPage(stories=stories[:limit], next_page_token=next_token)


async def set_story_image(pool: asyncpg.Pool, *, story_id: str, storage_id: str) -> Story:
    """Attaches the portrait; setting the same storage_id again changes nothing."""
    story_id = validate_story_id(story_id)
    storage_id = _require_text("storage_id", storage_id, MAX_STORAGE_ID_LENGTH)
    async with pool.acquire() as conn:
        story = await storage.attach_portrait(conn, story_id, storage_id)
        if story is None:
            story = await storage.get_story(conn, story_id)
            if story is None:
                raise NotFound(f"story_id: no story {story_id}")
            return story
    log.info("story.portrait_ready", extra={"story_id": story_id, "storage_id": storage_id})
    return story


async def set_portrait_status(pool: asyncpg.Pool, *, story_id: str, status: PortraitStatus | None, reason: str) -> Story:
    """Records FAILED or SKIPPED; a READY portrait is never taken back."""
    story_id = validate_story_id(story_id)
    if status not in (PortraitStatus.FAILED, PortraitStatus.SKIPPED):
        raise InvalidArgument("status", "must be PORTRAIT_STATUS_FAILED or PORTRAIT_STATUS_SKIPPED")
    reason = _require_text("reason", reason, MAX_REASON_LENGTH)
    async with pool.acquire() as conn:
        story = await storage.end_portrait(conn, story_id, status.value, reason)
        if story is None:
            story = await storage.get_story(conn, story_id)
            if story is None:
                raise NotFound(f"story_id: no story {story_id}")
            return story
    log.info("story.portrait_ended", extra={"story_id": story_id, "status": status.value, "reason": reason})
    return story


async def retry_portrait(pool: asyncpg.Pool, *, story_id: str, on_committed: Callable[[], None] | None = None) -> Story:
    """Sets the portrait PENDING again and queues a new `story.created` for it."""
    story_id = validate_story_id(story_id)
    async with pool.acquire() as conn:
        async with conn.transaction():
            story = await storage.get_story(conn, story_id, for_update=True)
            if story is None:
                raise NotFound(f"story_id: no story {story_id}")
            if story.portrait_status is PortraitStatus.READY:
                raise FailedPrecondition("story_id: the portrait is already READY")
            story = await storage.restart_portrait(conn, story_id)
            await storage.insert_outbox_event(conn, story_id, story.portrait_attempt)
    log.info("story.portrait_retried", extra={"story_id": story_id, "attempt": story.portrait_attempt})
    if on_committed is not None:
        on_committed()
    return story


async def watch_story(pool: asyncpg.Pool, *, story_id: str, poll_interval: float = 0.2) -> AsyncIterator[Story]:
    """Yields the story now, then each change, until its portrait is final.

    Polling one indexed row keeps this correct across several story processes (the change
    may be made by another one); a watcher costs one cheap query per interval.
    """
    story = await get_story(pool, story_id)
    yield story
    while story.portrait_status not in FINAL_PORTRAIT_STATUSES:
        await asyncio.sleep(poll_interval)
        async with pool.acquire() as conn:
            update_time = await storage.story_update_time(conn, story.story_id)
            if update_time is None or update_time == story.update_time:
                continue
            story = await storage.get_story(conn, story.story_id)
        if story is None:
            return
        yield story

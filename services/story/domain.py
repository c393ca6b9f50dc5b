"""Stories: what a valid case file is, and the use cases that write and change them.

No gRPC, no SQL text, no HTTP here: storage functions, the writer and the change feed come
in as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from services.story import storage
from shared import page_tokens
from shared.coalescing import Coalescer
from shared.change_feed import WatcherLimitReached
from services.story import model
from services.story.difficulty import story_typing_difficulty
from services.story.model import (
    CALLER_WRITER,
    FINAL_PORTRAIT_STATUSES,
    Authorship,
    Chapter,
    Gender,
    PageCursor,
    Patient,
    PortraitStatus,
    Story,
    StoryContent,
    StoryPage,
)
from services.story.writers.base import StoryWriter, WriterError
from shared.db import pooled_connection
from shared.logs import logged_step
from shared.outbox import OutboxRow
from shared.validation import id_problem, optional_id_problem, text_problem

__all__ = [
    "Chapter",
    "Gender",
    "Patient",
    "PortraitStatus",
    "Story",
    "StoryContent",
    "StoryPage",
]

log = logging.getLogger(__name__)

MAX_STORAGE_ID_LENGTH = 1024
MAX_REASON_LENGTH = 1000
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# A page stops before it would pass this many bytes of text, so that it fits a client's
# default 4 MiB message limit (grpcurl's, grpc's) with room to spare: thirty stories at the
# longest a case file may be would not. A page always holds at least one story.
MAX_PAGE_TEXT_BYTES = 3 * 1024 * 1024
MAX_ATTEMPT = 2**31 - 1
STORE_RETRY_SECONDS = 1.0
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# The spelling str(uuid.UUID(...)) gives, which is what every client sends back: matching
# it costs a fifth of parsing and printing the UUID, on every call that names a story.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Page tokens never name a time outside this range; anything else is forged.
_EARLIEST_CURSOR = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_LATEST_CURSOR = datetime.datetime(9000, 1, 1, tzinfo=datetime.UTC)


# --- errors: named after what happened; handlers.ERRORS picks the status code ----------


class DomainError(Exception):
    """A request the story service refuses or cannot serve now."""


class InvalidField(DomainError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class StoryNotFound(DomainError):
    def __init__(self, story_id: str) -> None:
        super().__init__(f"story_id: no story {story_id}")
        self.metadata = {"story_id": story_id}


class StaleAttempt(DomainError):
    """The caller speaks of a portrait attempt that is no longer the story's current one."""

    def __init__(self, story_id: str, attempt: int, current: int) -> None:
        super().__init__(f"attempt: {attempt} is not the current portrait attempt ({current}) of story {story_id}")
        self.metadata = {"story_id": story_id, "attempt": str(attempt), "current_attempt": str(current)}


class PortraitAlreadyFinal(DomainError):
    """This attempt already ended in another way; it cannot end a second time."""

    def __init__(self, story: Story) -> None:
        super().__init__(f"attempt: portrait attempt {story.portrait_attempt} already ended {story.portrait_status}")
        self.metadata = {"story_id": story.story_id, "portrait_status": story.portrait_status.value}


class PortraitAlreadyReady(DomainError):
    def __init__(self, story_id: str) -> None:
        super().__init__("story_id: the portrait is already READY")
        self.metadata = {"story_id": story_id}


class PortraitInProgress(DomainError):
    """RetryPortrait while the current attempt is still being painted."""

    def __init__(self, story: Story) -> None:
        super().__init__(f"story_id: portrait attempt {story.portrait_attempt} is still being painted")
        self.metadata = {"story_id": story.story_id, "attempt": str(story.portrait_attempt)}


class WriterUnavailable(DomainError):
    """The writer model failed or wrote something unusable; nothing was stored."""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        # The model's own Retry-After, when it gave one: the caller's RetryInfo.
        self.retry_after_seconds = retry_after_seconds


class StoreUnavailable(DomainError):
    """The story database cannot be reached; nothing was changed."""

    # The pool reconnects on the next call, so a caller may try again at once; a second
    # spares a database that is coming back from a flood of retries.
    retry_after_seconds = STORE_RETRY_SECONDS


class TooManyWatchers(DomainError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"this server already streams {limit} stories; try again shortly")
        self.retry_after_seconds = 1.0


# --- validation -------------------------------------------------------------------------


def _check(field: str, problem: str | None) -> None:
    if problem is not None:
        raise InvalidField(field, problem)


def _require_text(field: str, value: str, max_length: int, *, allowed_controls: str = "") -> str:
    _check(field, text_problem(value, max_chars=max_length, allowed_controls=allowed_controls))
    return value.strip()


def validate_user_id(user_id: str) -> str:
    _check("user_id", id_problem(user_id))
    return user_id


def validate_request_id(request_id: str) -> str | None:
    """An empty request_id means the caller wants no idempotency."""
    _check("request_id", optional_id_problem(request_id))
    return request_id or None


def validate_story_id(story_id: str, field: str = "story_id") -> str:
    if not story_id:
        raise InvalidField(field, "must not be empty")
    if len(story_id) > 64:
        raise InvalidField(field, "must be a UUID")
    if _CANONICAL_UUID.fullmatch(story_id):
        return story_id
    try:
        return str(uuid.UUID(story_id))
    except ValueError:
        raise InvalidField(field, "must be a UUID") from None


def validate_attempt(attempt: int) -> int:
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise InvalidField("attempt", "must be the story's portrait_attempt (1 or more)")
    return attempt


def validate_content(content: StoryContent, prefix: str = "content") -> StoryContent:
    """Checks every field of a case file against the limits of services.story.model; the
    error names the first bad field."""
    title = _require_typeable(f"{prefix}.title", content.title, model.MAX_TITLE_CHARS)
    if content.patient is None:
        raise InvalidField(f"{prefix}.patient", "is required")
    patient = _validate_patient(content.patient, f"{prefix}.patient")
    if not model.MIN_CHAPTERS <= len(content.chapters) <= model.MAX_CHAPTERS:
        raise InvalidField(
            f"{prefix}.chapters",
            f"must have {model.MIN_CHAPTERS} to {model.MAX_CHAPTERS} chapters, not {len(content.chapters)}",
        )
    chapters = tuple(
        Chapter(
            title=_require_typeable(f"{prefix}.chapters[{i}].title", chapter.title, model.MAX_CHAPTER_TITLE_CHARS),
            text=_require_typeable(
                f"{prefix}.chapters[{i}].text", chapter.text, model.MAX_CHAPTER_TEXT_CHARS, paragraphs=True
            ),
        )
        for i, chapter in enumerate(content.chapters)
    )
    prompt = content.image_generation_prompt
    # A blank prompt is allowed: the image service marks such a portrait SKIPPED.
    _check(
        f"{prefix}.image_generation_prompt",
        text_problem(prompt, max_chars=model.MAX_IMAGE_PROMPT_CHARS, required=False),
    )
    return StoryContent(title=title, patient=patient, chapters=chapters, image_generation_prompt=prompt.strip())


def _require_typeable(field: str, value: str, max_length: int, *, paragraphs: bool = False) -> str:
    """Text the player types: within bounds, and nothing a keyboard lacks (no markup, no tabs)."""
    text = _require_text(field, value, max_length, allowed_controls=model.PARAGRAPH_BREAK if paragraphs else "")
    odd = model.untypeable_chars(text, newlines=paragraphs)
    if odd:
        shown = " ".join(repr(char) if not char.isprintable() or char.isspace() else char for char in odd[:10])
        raise InvalidField(field, f"must be plain typeable text without markup; remove {shown}")
    return text


def _validate_patient(patient: Patient, prefix: str) -> Patient:
    if not model.MIN_AGE <= patient.age <= model.MAX_AGE:
        raise InvalidField(f"{prefix}.age", f"must be between {model.MIN_AGE} and {model.MAX_AGE}")
    if patient.gender is None:
        raise InvalidField(f"{prefix}.gender", f"is required: one of {', '.join(g.name for g in Gender)}")
    admitted = patient.admission_date
    if admitted is None:
        raise InvalidField(f"{prefix}.admission_date", "is required, as YYYY-MM-DD")
    if not model.EARLIEST_ADMISSION <= admitted <= model.LATEST_ADMISSION:
        raise InvalidField(
            f"{prefix}.admission_date",
            f"must be from {model.EARLIEST_ADMISSION.isoformat()} to {model.LATEST_ADMISSION.isoformat()}",
        )
    return Patient(
        name=_require_text(f"{prefix}.name", patient.name, model.MAX_NAME_CHARS),
        age=patient.age,
        diagnosis=_require_text(f"{prefix}.diagnosis", patient.diagnosis, model.MAX_DIAGNOSIS_CHARS),
        appearance=_require_text(f"{prefix}.appearance", patient.appearance, model.MAX_APPEARANCE_CHARS),
        gender=patient.gender,
        admission_date=admitted,
    )


def parse_admission_date(value: str, field: str) -> datetime.date:
    """An ISO calendar date, YYYY-MM-DD exactly; anything else names `field`."""
    if len(value) != 10 or not _ISO_DATE.fullmatch(value):
        raise InvalidField(field, "must be a date written YYYY-MM-DD")
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise InvalidField(field, "must be a real calendar date written YYYY-MM-DD") from None


def _one_line(value: Any) -> str:
    # The writer is our own model, not a caller: its stray newlines are tidied, not refused.
    return " ".join(str(value).split())


def content_from_writer(draft: Mapping[str, Any]) -> StoryContent:
    """Reads the writer's JSON object; a shape error is the writer's fault, not the caller's."""
    try:
        patient = draft["patient"]
        content = StoryContent(
            title=_one_line(draft["title"]),
            patient=Patient(
                name=_one_line(patient["name"]),
                age=int(patient["age"]),
                diagnosis=_one_line(patient["diagnosis"]),
                appearance=_one_line(patient["appearance"]),
                gender=Gender(str(patient["gender"])),
                admission_date=parse_admission_date(str(patient["admission_date"]), "story.patient.admission_date"),
            ),
            chapters=tuple(Chapter(title=_one_line(c["title"]), text=str(c["text"])) for c in draft["chapters"]),
            image_generation_prompt=_one_line(draft.get("image_generation_prompt") or ""),
        )
        return validate_content(content, prefix="story")
    except (KeyError, TypeError, ValueError, InvalidField) as error:
        raise WriterUnavailable(f"the writer returned an unusable story: {error}") from None


# --- page tokens ------------------------------------------------------------------------


def encode_page_token(last: Story, user_id: str) -> str:
    return page_tokens.encode({"k": page_tokens.list_key(user_id), "t": last.create_time.isoformat(),
                               "s": last.story_id})  # fmt: skip


def decode_page_token(token: str, user_id: str) -> PageCursor:
    """Every part of a token is checked: a forged one is INVALID_ARGUMENT, never a crash;
    another user's is refused. A token made before tokens named their list (a list of the
    time and the id) still resumes its walk."""
    invalid = InvalidField("page_token", "is not a token this method returned")
    parts = page_tokens.decode(token)
    if isinstance(parts, dict):
        if parts.get("k") != page_tokens.list_key(user_id):
            raise InvalidField("page_token", "belongs to another user's list; list this user without a page_token")
        parts = [parts.get("t"), parts.get("s")]
    if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(part, str) for part in parts)):
        raise invalid
    try:
        create_time = datetime.datetime.fromisoformat(parts[0])
        story_id = str(uuid.UUID(parts[1]))
        in_range = create_time.tzinfo is not None and _EARLIEST_CURSOR <= create_time <= _LATEST_CURSOR
    except (ValueError, OverflowError, TypeError):
        raise invalid from None
    if not in_range:
        raise invalid
    return PageCursor(create_time, story_id)


# --- repeated requests ------------------------------------------------------------------


def request_digest(operation: str, arguments: Any) -> str:
    """What a request_id was sent with (the operation and its validated arguments)."""
    encoded = json.dumps([operation, arguments], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def _replayed(found: tuple[Story, str | None] | None, digest: str) -> Story | None:
    """The story a repeat of the request made first; a repeat with other arguments is refused,
    as the image and credits services refuse theirs (rows older than digests are answered)."""
    if found is None:
        return None
    story, first_digest = found
    if first_digest is not None and first_digest != digest:
        raise InvalidField("request_id", "already used for a story with other arguments; send a new request_id")
    return story


# --- use cases --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; the database being away becomes StoreUnavailable."""
    try:
        async with pooled_connection(pool, storage.STATEMENT_TIMEOUT_SECONDS) as conn:
            yield conn
    except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
            asyncpg.ConnectionDoesNotExistError, asyncpg.exceptions.QueryCanceledError) as error:
        raise StoreUnavailable(f"the story database is unavailable: {type(error).__name__}") from None


async def create_story(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    content: StoryContent,
    request_id: str,
    events: EventHandoff | None = None,
) -> Story:
    """Stores a caller-written story and its `story.created` outbox row in one transaction."""
    user_id = validate_user_id(user_id)
    request_key = validate_request_id(request_id)
    content = validate_content(content)
    return await _store_new_story(
        pool,
        user_id=user_id,
        content=content,
        request_key=request_key,
        digest=request_digest("CreateStory", dataclasses.asdict(content)),
        authorship=Authorship(writer=CALLER_WRITER),
        events=events,
    )


class RequestsInProgress:
    """One lock per (user_id, request_id) while calls carrying it run in this process: a
    gateway that retries a slow GenerateStory waits for the first call's story instead of
    paying the writer model again. (Across processes the unique key still makes one story;
    only the writer's work can repeat.)"""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def one_at_a_time(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, holders = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, holders + 1)
        try:
            async with lock:
                yield
        finally:
            _, holders = self._locks[key]
            if holders == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, holders - 1)


async def generate_story(
    pool: asyncpg.Pool,
    writer: StoryWriter,
    *,
    user_id: str,
    theme: str,
    request_id: str,
    in_progress: RequestsInProgress,
    events: EventHandoff | None = None,
) -> Story:
    """Asks the writer for a story, then stores it like create_story; calls carrying one
    request_id take turns through `in_progress` (the servicer's, one per process)."""
    user_id = validate_user_id(user_id)
    request_key = validate_request_id(request_id)
    _check("theme", text_problem(theme, max_chars=model.MAX_THEME_CHARS, required=False))
    theme = theme.strip()
    digest = request_digest("GenerateStory", theme)
    if request_key is None:
        return await _write_and_store(pool, writer, user_id=user_id, theme=theme, request_key=None, digest=digest,
                                      events=events)  # fmt: skip
    async with in_progress.one_at_a_time((user_id, request_key)):
        async with _connection(pool) as conn:
            existing = _replayed(await storage.find_by_request(conn, user_id, request_key), digest)
        if existing is not None:
            return existing
        return await _write_and_store(pool, writer, user_id=user_id, theme=theme, request_key=request_key,
                                      digest=digest, events=events)  # fmt: skip


async def _write_and_store(
    pool: asyncpg.Pool,
    writer: StoryWriter,
    *,
    user_id: str,
    theme: str,
    request_key: str | None,
    digest: str,
    events: EventHandoff | None,
) -> Story:
    story_id = str(uuid.uuid4())
    # The first step of the portrait pipeline (attempt 1): its lines match the image service's.
    ids = {"story_id": story_id, "attempt": 1, "user_id": user_id}
    try:
        with logged_step(log, "story", "write", ids, writer=writer.name, model=writer.model):
            draft = await writer.write(theme=theme or None, seed=f"{user_id}\x00{request_key or story_id}")
            content = content_from_writer(draft)
    except WriterError as error:
        raise WriterUnavailable(f"the story writer failed: {error}", retry_after_seconds=error.retry_after) from None
    return await _store_new_story(
        pool,
        user_id=user_id,
        content=content,
        request_key=request_key,
        digest=digest,
        authorship=Authorship(writer=writer.name, model=writer.model, theme=theme),
        story_id=story_id,
        events=events,
    )


async def _store_new_story(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    content: StoryContent,
    request_key: str | None,
    digest: str,
    authorship: Authorship,
    story_id: str | None = None,
    events: EventHandoff | None = None,
) -> Story:
    story_id = story_id or str(uuid.uuid4())
    difficulty = story_typing_difficulty(content.title, content.chapters)
    async with _connection(pool) as conn, conn.transaction():
        story = await storage.insert_story(
            conn, story_id, user_id, request_key, content, typing_difficulty=difficulty, authorship=authorship,
            request_digest=digest if request_key is not None else None,
        )  # fmt: skip
        if story is None:
            # The same request_id already made a story: answer with it, write nothing.
            existing = _replayed(await storage.find_by_request(conn, user_id, request_key), digest)
            assert existing is not None, "insert conflicted, so the row exists"
            return existing
        queued = await storage.insert_outbox_event(conn, story, claim_seconds=_claim_seconds(events))
    log.info("story.created", extra={"story_id": story.story_id, "user_id": user_id})
    _hand_off(events, queued)
    return story


StoryReads = Coalescer[str, Story]


def story_reads(pool: asyncpg.Pool) -> StoryReads:
    """Reads of stories by id: calls that come while a read is on its way share the next
    SELECT (shared/coalescing.py)."""
    decoded = storage.DecodedStories()

    async def fetch(story_ids: list[str]) -> dict[str, Story]:
        async with _connection(pool) as conn:
            return await storage.get_stories(conn, story_ids, decoded)

    return Coalescer(fetch)


async def get_story(reads: StoryReads, story_id: str) -> Story:
    story_id = validate_story_id(story_id)
    story = await reads.ask(story_id)
    if story is None:
        raise StoryNotFound(story_id)
    return story


async def list_stories(pool: asyncpg.Pool, *, user_id: str, page_size: int, page_token: str) -> StoryPage:
    user_id = validate_user_id(user_id)
    if page_size < 0:
        raise InvalidField("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = decode_page_token(page_token, user_id) if page_token else None
    async with _connection(pool) as conn:
        stories = await storage.list_stories(conn, user_id, limit + 1, after)
    page = _within_bytes(stories[:limit], MAX_PAGE_TEXT_BYTES)
    next_token = encode_page_token(page[-1], user_id) if len(stories) > len(page) else ""
    return StoryPage(stories=page, next_page_token=next_token)


def _within_bytes(stories: list[Story], budget: int) -> list[Story]:
    """The first stories whose text fits `budget` (at least one)."""
    used = 0
    for count, story in enumerate(stories):
        used += _text_bytes(story)
        if used > budget and count > 0:
            return stories[:count]
    return stories


def _text_bytes(story: Story) -> int:
    content = story.content
    texts = [content.title, content.image_generation_prompt, story.portrait_error, story.authorship.theme or ""]
    texts += [part for chapter in content.chapters for part in (chapter.title, chapter.text)]
    if content.patient is not None:
        patient = content.patient
        texts += [patient.name, patient.diagnosis, patient.appearance]
    # A few hundred bytes more per story for ids, times, numbers and the message framing.
    return sum(len(text.encode()) for text in texts) + 512


async def set_story_image(pool: asyncpg.Pool, *, story_id: str, storage_id: str, attempt: int) -> Story:
    """Attaches the portrait of `attempt`; the same storage_id again changes nothing."""
    story_id = validate_story_id(story_id)
    _check("storage_id", id_problem(storage_id, max_chars=MAX_STORAGE_ID_LENGTH))
    attempt = validate_attempt(attempt)
    async with _connection(pool) as conn:
        found = await storage.attach_portrait(conn, story_id, storage_id, attempt)
    if found is None:
        raise StoryNotFound(story_id)
    story, attached = found
    if attached:
        log.info("story.portrait_attached", extra={"story_id": story_id, "storage_id": storage_id, "attempt": attempt})
        return story
    if story.portrait_attempt != attempt:
        raise StaleAttempt(story_id, attempt, story.portrait_attempt)
    if story.portrait_status is PortraitStatus.READY and story.storage_id == storage_id:
        return story
    raise PortraitAlreadyFinal(story)


async def set_portrait_status(
    pool: asyncpg.Pool, *, story_id: str, status: PortraitStatus | None, reason: str, attempt: int
) -> Story:
    """Records FAILED or SKIPPED for `attempt`; a READY portrait is never taken back, and
    an attempt that ended FAILED or SKIPPED keeps its first ending (its watchers have
    already been told it and gone)."""
    story_id = validate_story_id(story_id)
    if status not in (PortraitStatus.FAILED, PortraitStatus.SKIPPED):
        raise InvalidField("status", "must be PORTRAIT_STATUS_FAILED or PORTRAIT_STATUS_SKIPPED")
    reason = _require_text("reason", reason, MAX_REASON_LENGTH)
    attempt = validate_attempt(attempt)
    async with _connection(pool) as conn, conn.transaction():
        story = await _current_attempt(conn, story_id, attempt)
        unchanged = story.portrait_status is status and story.portrait_error == reason
        if story.portrait_status is PortraitStatus.READY or unchanged:
            return story
        if story.portrait_status is not PortraitStatus.PENDING:
            raise PortraitAlreadyFinal(story)
        story = await storage.end_portrait(conn, story_id, status.value, reason)
    log.info(
        "story.portrait_ended",
        extra={"story_id": story_id, "status": status.value, "reason": reason, "attempt": attempt},
    )
    return story


async def _current_attempt(conn: asyncpg.Connection, story_id: str, attempt: int) -> Story:
    """The story, locked, if `attempt` is its current portrait attempt."""
    story = await storage.get_story(conn, story_id, for_update=True)
    if story is None:
        raise StoryNotFound(story_id)
    if story.portrait_attempt != attempt:
        raise StaleAttempt(story_id, attempt, story.portrait_attempt)
    return story


async def retry_portrait(pool: asyncpg.Pool, *, story_id: str, events: EventHandoff | None = None) -> Story:
    """Starts a new portrait attempt (PENDING again) and queues its `story.created`."""
    story_id = validate_story_id(story_id)
    async with _connection(pool) as conn, conn.transaction():
        story = await storage.get_story(conn, story_id, for_update=True)
        if story is None:
            raise StoryNotFound(story_id)
        if story.portrait_status is PortraitStatus.READY:
            raise PortraitAlreadyReady(story_id)
        if story.portrait_status is PortraitStatus.PENDING:
            # The image service ends every attempt (READY, FAILED or SKIPPED), so a retry
            # waits for that instead of racing a painter of the same story.
            raise PortraitInProgress(story)
        story = await storage.restart_portrait(conn, story_id)
        queued = await storage.insert_outbox_event(conn, story, claim_seconds=_claim_seconds(events))
    log.info("story.portrait_retried", extra={"story_id": story_id, "attempt": story.portrait_attempt})
    _hand_off(events, queued)
    return story


class EventHandoff(Protocol):
    """Takes a committed `story.created` straight to NATS (shared.outbox.OutboxRelay.hand_off)."""

    @property
    def claim_seconds(self) -> float: ...

    def hand_off(self, row: OutboxRow) -> None: ...


def _claim_seconds(events: EventHandoff | None) -> float | None:
    # Without a handoff the row is inserted unclaimed and its insert wakes the relays.
    return events.claim_seconds if events is not None else None


def _hand_off(events: EventHandoff | None, queued: OutboxRow | None) -> None:
    """Called after the commit only: a rolled-back story must never be announced."""
    if events is not None and queued is not None:
        events.hand_off(queued)


# --- watching ---------------------------------------------------------------------------


class StoryChanges(Protocol):
    """Tells a watcher that a story changed (shared/change_feed.py)."""

    def watch(self, story_id: str) -> contextlib.AbstractAsyncContextManager[Any]: ...


@dataclass(frozen=True)
class WatchLimits:
    max_seconds: float = 900.0


async def watch_story(
    reads: StoryReads,
    changes: StoryChanges,
    *,
    story_id: str,
    limits: WatchLimits = WatchLimits(),
) -> AsyncIterator[Story]:
    """Yields the story now, then each change, until its portrait is final or the stream
    has lasted `limits.max_seconds` (it then ends with the current state)."""
    story_id = validate_story_id(story_id)
    try:
        watching = changes.watch(story_id)
        subscription = await watching.__aenter__()
    except WatcherLimitReached as error:
        raise TooManyWatchers(error.limit) from None
    try:
        async for story in _changes_until_final(reads, subscription, story_id, limits):
            yield story
    finally:
        await watching.__aexit__(None, None, None)


async def _changes_until_final(
    reads: StoryReads, subscription: Any, story_id: str, limits: WatchLimits
) -> AsyncIterator[Story]:
    # Subscribed before the first read, so no change can slip between the two; watchers of
    # one story share each read (subscription.current).
    story = await subscription.current(lambda: get_story(reads, story_id))
    yield story
    deadline = subscription.now() + limits.max_seconds
    while story.portrait_status not in FINAL_PORTRAIT_STATUSES:
        changed = await subscription.wait(deadline - subscription.now())
        latest = await subscription.current(lambda: get_story(reads, story_id))
        if latest.update_time != story.update_time:
            story = latest
            yield story
        if not changed:
            return  # the stream lasted its maximum; the client watches again

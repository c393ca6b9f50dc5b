"""The portrait pipeline: rules and use cases. No grpc, no SQL text, no HTTP here.

An event says "story X may need its portrait"; it is a hint, never an authority. The story
service says what the current attempt and its prompt are, so a forged or stale event paints
nothing. Each attempt goes PENDING -> READY (the picture in S3 under a key of its own as
soon as it exists, then the story told), or ends SKIPPED or FAILED. Two states in between
are recorded only when a step fails: GENERATED (the picture kept in the database) when S3
refused it, STORED (in S3, the story not told) when the story service did. A redelivery
resumes from the first step not done (a PENDING one first checks S3 for its key), so the
provider is paid once per attempt. One worker at a time holds an attempt (a lease kept alive while it
works); every step is bounded in time, and the consumer bounds the whole delivery by the
sum, so the lease and the heartbeats always outlive the work they cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg
from PIL import Image

from services.image.durable_consumer import Outcome, ack, retry
from services.image.errors import DependencyUnavailable, LeaseLost
from services.image.lease import LeaseTiming, lease_kept
from services.image.portraits import storage
from services.image.portraits.metrics import PORTRAITS_FINISHED, observe_step
from services.image.portraits.storage import AttemptStatus, PortraitClaim
from services.image.providers.base import GeneratedImage, ImageProvider, ProviderError, ProviderNotConfigured
from shared.logs import logged_step
from shared.metrics import PROVIDER_RETRIES, ProviderKind, ProviderOutcome, observe_provider_call, retry_reason

log = logging.getLogger(__name__)

PORTRAIT_PREFIX = "portraits/"
PORTRAIT_SIDE = 1024
BLANK_PROMPT_REASON = "image_generation_prompt is blank"
# The story service accepts reasons of 1 to 1000 characters.
MAX_REASON_CHARS = 1000
# Failures a later delivery may get past: S3, the story service or the database away or slow.
_TRANSIENT = (DependencyUnavailable, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


# ---------------------------------------------------------------- errors and ports


class PortraitError(Exception):
    """The story service refused a call of the pipeline."""


class StoryGone(PortraitError):
    """No such story: nothing to paint, nobody to tell."""


class StoryMovedOn(PortraitError):
    """The story refused: the attempt is stale, or already ended another way."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class StoryRejected(PortraitError):
    """The story service refused the request itself (a malformed call: our bug)."""


class StoryStatus(enum.StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class StoryView:
    """What the story service says about a story: the authority the event is not."""

    story_id: str
    prompt: str
    attempt: int
    status: StoryStatus
    storage_id: str

    @property
    def final(self) -> bool:
        return self.status is not StoryStatus.PENDING


class Stories(Protocol):
    async def get_story(self, story_id: str) -> StoryView: ...
    async def set_story_image(self, story_id: str, storage_id: str, attempt: int) -> None: ...
    async def set_portrait_status(self, story_id: str, status: StoryStatus, reason: str, attempt: int) -> None: ...


class PortraitObjects(Protocol):
    async def put_new(self, key: str, data: bytes, content_type: str, *, known_absent: bool = False) -> bool: ...
    async def exists(self, key: str) -> bool: ...


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class PortraitEvent:
    story_id: uuid.UUID
    attempt: int


class UnusableEvent(Exception):
    """An event that can never be acted on (not a UUID, a negative attempt)."""


def portrait_event(story_id: str, attempt: int) -> PortraitEvent:
    try:
        parsed_id = uuid.UUID(story_id)
    except ValueError:
        raise UnusableEvent("story_id: must be a UUID") from None
    if attempt < 0:
        raise UnusableEvent("portrait_attempt: must not be negative")
    # proto3 sends 0 when a publisher leaves the field unset; that is the first attempt.
    return PortraitEvent(parsed_id, max(attempt, 1))


@dataclass(frozen=True)
class PortraitTimeouts:
    """Every call a delivery makes is bounded; their sum bounds the whole delivery."""

    provider_seconds: float = 90.0  # one provider call, download included
    step_seconds: float = 10.0  # one SQL statement, S3 call or story call
    # get story, claim, an earlier upload's check, keep or read kept, 2 S3 calls, mark
    # stored, attach, mark final, and a release or a status report after a failure (every
    # path takes fewer: keep and mark stored never both run in one delivery).
    STEPS_PER_DELIVERY = 11

    @property
    def longest_delivery_seconds(self) -> float:
        # The PNG conversion of a provider's WEBP is CPU work of well under a step.
        return self.provider_seconds + (self.STEPS_PER_DELIVERY + 1) * self.step_seconds


@dataclass(frozen=True)
class PortraitDeps:
    pool: Any  # an asyncpg pool: storage functions get one of its connections
    provider: ImageProvider
    objects: PortraitObjects
    stories: Stories
    lease: LeaseTiming
    timeouts: PortraitTimeouts = PortraitTimeouts()
    # Transient provider failures are retried through redeliveries for this long from the
    # attempt's first delivery; then the portrait FAILS.
    provider_budget_seconds: float = 60.0


def portrait_key(story_id: uuid.UUID, attempt: int) -> str:
    """One object per attempt: a retry never overwrites the picture of an earlier one."""
    return f"{PORTRAIT_PREFIX}{story_id}/{attempt}.png"


class _ProviderTransient(Exception):
    def __init__(self, reason: str, retry_after: float | None, retry_reason: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.retry_reason = retry_reason  # the metric's label: rate_limited, timeout, ...


# ---------------------------------------------------------------- the use cases


async def paint_portrait(event: PortraitEvent, deps: PortraitDeps, *, delivery: int, final: bool) -> Outcome:
    """Advances one attempt as far as it goes now; the Outcome tells the consumer what next."""
    ids = _ids(event, delivery=delivery)
    story = await _story_or_outcome(event, deps, ids)
    if isinstance(story, Outcome):
        return story
    lease_owner = uuid.uuid4()
    try:
        with _step("claim", ids):
            claim = await _claim(deps, event, lease_owner)
    except _TRANSIENT as error:
        return retry(_describe(error))
    if claim.status in storage.FINAL_STATUSES:
        log.info("portrait.already_done", extra={**ids, "status": claim.status})
        return ack("ALREADY_DONE")
    if not claim.claimed:
        # Another worker holds this attempt (a duplicate event, or a live worker whose
        # message came back); it owns the outcome.
        log.info("portrait.attempt_already_claimed", extra=ids)
        # The consumer's usual backoff, not the whole lease: the holder usually finishes soon.
        return retry("another worker is painting this portrait", status="BUSY")
    return await _under_lease(event, deps, lease_owner, ids, _advance(event, story, claim, lease_owner, deps, ids, final))


async def end_abandoned_portrait(event: PortraitEvent, deps: PortraitDeps) -> Outcome:
    """No delivery will reach this attempt any more: it ends FAILED, once nobody holds it."""
    ids = _ids(event, step="abandoned")
    story = await _story_or_outcome(event, deps, ids)
    if isinstance(story, Outcome):
        return story
    lease_owner = uuid.uuid4()
    try:
        claim = await _claim(deps, event, lease_owner)
    except _TRANSIENT as error:
        return retry(_describe(error))
    if claim.status in storage.FINAL_STATUSES:
        return ack("ALREADY_DONE")
    if not claim.claimed:
        # A live worker still holds it and may yet finish; ask again once its lease is due.
        return retry("still held by a worker", delay_seconds=claim.lease_seconds_left + 0.5, status="BUSY")
    reason = f"gave up: no delivery left for attempt {event.attempt}"
    if claim.error:
        reason += f" (last error: {claim.error})"
    log.error("portrait.abandoned", extra={**ids, "error": reason})

    async def fail() -> Outcome:
        return await _finish(event, lease_owner, deps, AttemptStatus.FAILED, reason)

    return await _under_lease(event, deps, lease_owner, ids, fail())


async def _story_or_outcome(event: PortraitEvent, deps: PortraitDeps, ids: dict) -> StoryView | Outcome:
    """The story, if this event's attempt is its current one and still open."""
    try:
        with _step("read_story", ids):
            story = await deps.stories.get_story(str(event.story_id))
    except StoryGone:
        log.warning("portrait.story_gone", extra=ids)
        return ack("STORY_GONE")
    except (StoryRejected, StoryMovedOn) as error:
        log.error("portrait.story_refused", extra={**ids, "error": str(error)})
        return ack("STORY_REFUSED")
    except _TRANSIENT as error:
        return retry(_describe(error))
    if story.attempt != event.attempt or story.final:
        # A forged, replayed or stale event: the story says what is current, not the event.
        log.warning(
            "portrait.event_outdated",
            extra={**ids, "current_attempt": story.attempt, "story_status": story.status.value},
        )
        return ack("NOT_CURRENT")
    return story


async def _under_lease(
    event: PortraitEvent, deps: PortraitDeps, lease_owner: uuid.UUID, ids: dict, work: Any
) -> Outcome:
    async def renew() -> bool:
        async with deps.pool.acquire(timeout=deps.timeouts.step_seconds) as conn:
            return await storage.renew_lease(
                conn, event.story_id, event.attempt, lease_owner, deps.lease.seconds, timeout=deps.timeouts.step_seconds
            )

    try:
        async with lease_kept(renew, deps.lease, log_fields=ids):
            return await work
    except LeaseLost:
        return retry("the lease was lost; whoever holds it now finishes the attempt", status="LEASE_LOST")
    except asyncio.CancelledError:
        # Shutting down: give the attempt back so the redelivery need not wait for the lease.
        await _release(event, lease_owner, deps, "interrupted by shutdown")
        raise
    except _TRANSIENT as error:
        await _release(event, lease_owner, deps, _describe(error))
        return retry(_describe(error))


async def _advance(
    event: PortraitEvent,
    story: StoryView,
    claim: PortraitClaim,
    lease_owner: uuid.UUID,
    deps: PortraitDeps,
    ids: dict,
    final: bool,
) -> Outcome:
    try:
        return await _resume(event, story, claim, lease_owner, deps, ids)
    except _ProviderTransient as error:
        if final or _budget_spent(claim, deps):
            return await _give_up(event, lease_owner, deps, claim.deliveries, str(error))
        PROVIDER_RETRIES.labels(ProviderKind.IMAGE, _provider_name(deps), error.retry_reason).inc()
        await _release(event, lease_owner, deps, str(error))
        return retry(str(error), delay_seconds=error.retry_after)
    except _TRANSIENT as error:
        if final:
            return await _give_up(event, lease_owner, deps, claim.deliveries, _describe(error))
        raise


async def _resume(
    event: PortraitEvent, story: StoryView, claim: PortraitClaim, lease_owner: uuid.UUID, deps: PortraitDeps, ids: dict
) -> Outcome:
    """Runs the steps from the first one this attempt has not done yet."""
    if not story.prompt.strip():
        log.warning("portrait.blank_prompt_skipped", extra=ids)
        return await _finish(event, lease_owner, deps, AttemptStatus.SKIPPED, BLANK_PROMPT_REASON)
    key = portrait_key(event.story_id, event.attempt)
    status = claim.status
    if status is AttemptStatus.PENDING and claim.deliveries > 1 and await _uploaded_before(key, deps, ids):
        # An earlier delivery put the picture up and stopped before telling the story.
        return await _attach(event, lease_owner, key, deps, ids, stored=False)
    if status is AttemptStatus.PENDING:
        try:
            png = await _generate(story.prompt, deps, ids)
        except ProviderNotConfigured as error:
            log.error("portrait.provider_not_configured", extra={**ids, "error": error.reason})
            return await _finish(event, lease_owner, deps, AttemptStatus.FAILED, error.reason)
        except ProviderError as error:
            return await _finish(event, lease_owner, deps, AttemptStatus.FAILED, f"provider: {error.reason}")
        # The picture goes straight to S3, its durable home; only if S3 fails is it kept in
        # the database (GENERATED) for a redelivery to upload, so that nothing makes a
        # later delivery pay the provider again. Either way it is stored durably once
        # before the delivery ends; keeping 1 MB in PostgreSQL first cost more than the upload.
        try:
            # The key is known to be free: this is the attempt's first delivery (keys are
            # per attempt), or the check above just found nothing there.
            await _upload(event, key, deps, ids, png, known_absent=True)
        except _TRANSIENT as error:
            with _step("keep", ids):
                await _record(deps, storage.keep_generated, event, lease_owner, png)
            raise error from None
        return await _attach(event, lease_owner, key, deps, ids, stored=False)
    if status is AttemptStatus.GENERATED:
        await _upload(event, key, deps, ids, None)
        await _mark_stored(event, lease_owner, key, deps, ids)
    return await _attach(event, lease_owner, key, deps, ids, stored=True)


async def _uploaded_before(key: str, deps: PortraitDeps, ids: dict) -> bool:
    with _step("check_uploaded", ids, storage_id=key):
        return await deps.objects.exists(key)


async def _mark_stored(event: PortraitEvent, lease_owner: uuid.UUID, key: str, deps: PortraitDeps, ids: dict) -> None:
    with _step("mark_stored", ids, storage_id=key):
        await _record(deps, storage.mark_stored, event, lease_owner, key)


async def _generate(prompt: str, deps: PortraitDeps, ids: dict) -> bytes:
    """One provider call (no in-process retries: a retry waits as a delayed redelivery,
    holding no worker slot); PNG bytes, or ProviderError / _ProviderTransient."""
    provider = _provider_name(deps)
    with _step("generate", ids, provider=provider):
        started = time.perf_counter()
        outcome = ProviderOutcome.TRANSIENT_ERROR
        try:
            async with asyncio.timeout(deps.timeouts.provider_seconds):
                image = await deps.provider.generate(prompt=prompt, width=PORTRAIT_SIDE, height=PORTRAIT_SIDE)
            outcome = ProviderOutcome.OK
        except TimeoutError:
            raise _ProviderTransient(
                f"provider: no image within {deps.timeouts.provider_seconds:g} s", None, retry_reason(None, timed_out=True)
            ) from None
        except ProviderError as error:
            if error.transient:
                raise _ProviderTransient(f"provider: {error.reason}", error.retry_after, retry_reason(error.status)) from error
            outcome = ProviderOutcome.PERMANENT_ERROR
            raise
        finally:
            observe_provider_call(ProviderKind.IMAGE, provider, outcome, time.perf_counter() - started)
    if image.content_type == "image/png":
        return image.data  # already checked to be an image by the provider client: no thread hop
    try:
        return await asyncio.to_thread(_as_png, image)
    except Exception as error:  # Pillow raises many types for a corrupt file
        raise ProviderError(f"the provider's image cannot be read: {error}", transient=False) from None


def _as_png(image: GeneratedImage) -> bytes:
    # The key ends in .png whatever the provider sent (Recraft answers WEBP), so the bytes do too.
    if image.content_type == "image/png":
        return image.data
    with Image.open(io.BytesIO(image.data)) as picture:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()


async def _upload(
    event: PortraitEvent, key: str, deps: PortraitDeps, ids: dict, png: bytes | None, *, known_absent: bool = False
) -> None:
    """Puts the picture in S3: the one just generated (`png`), or, on a redelivery, the kept copy."""
    if png is None:
        step = deps.timeouts.step_seconds
        async with deps.pool.acquire(timeout=step) as conn:
            png = await storage.kept_png(conn, event.story_id, event.attempt, timeout=step)
    with _step("upload", ids, storage_id=key):
        if png is None:
            # Kept rows go only with STORED; a missing one means the object went up already.
            if not await deps.objects.exists(key):
                raise DependencyUnavailable(f"the kept picture of {key} is missing")
            return
        created = await deps.objects.put_new(key, png, "image/png", known_absent=known_absent)
    if not created:
        log.info("portrait.object_already_stored", extra={**ids, "storage_id": key})


async def _attach(
    event: PortraitEvent, lease_owner: uuid.UUID, key: str, deps: PortraitDeps, ids: dict, *, stored: bool
) -> Outcome:
    """Tells the story, then records READY (with the key) in one statement. `stored` says
    whether STORED is recorded already; a picture that went up in this delivery is recorded
    STORED only when the story cannot be told now, so the happy path writes the attempt
    twice in all (claim, READY). A redelivery that finds no STORED checks S3 for the key."""
    try:
        with _step("attach", ids, storage_id=key):
            await deps.stories.set_story_image(str(event.story_id), key, event.attempt)
    except (StoryGone, StoryMovedOn, StoryRejected) as error:
        # The story moved on (a newer attempt, or this one ended another way) or is gone:
        # the attempt is over for it, whatever we do; record why and stop.
        await _record(deps, storage.mark_final, event, lease_owner, AttemptStatus.FAILED, _trim(str(error)), key)
        return ack("STORY_REFUSED")
    except _TRANSIENT:
        if not stored:
            await _mark_stored_if_possible(event, lease_owner, key, deps, ids)
        raise
    await _record(deps, storage.mark_final, event, lease_owner, AttemptStatus.READY, None, key)
    PORTRAITS_FINISHED.labels(AttemptStatus.READY.value).inc()
    log.info("portrait.attempt_succeeded", extra={**ids, "storage_id": key})
    return ack("READY")


async def _mark_stored_if_possible(
    event: PortraitEvent, lease_owner: uuid.UUID, key: str, deps: PortraitDeps, ids: dict
) -> None:
    # Spares the redelivery its check of S3; if even this fails, that check finds the object.
    try:
        await _mark_stored(event, lease_owner, key, deps, ids)
    except (*_TRANSIENT, LeaseLost) as error:
        log.warning("portrait.mark_stored_failed", extra={**ids, "error": _describe(error)})


async def _finish(
    event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, status: AttemptStatus, reason: str
) -> Outcome:
    """Tells the story the portrait is SKIPPED or FAILED, then records it here."""
    reason = _trim(reason)
    ids = _ids(event)
    try:
        with _step("report_status", ids, status=status.value, reason=reason):
            await deps.stories.set_portrait_status(str(event.story_id), StoryStatus(status.value), reason, event.attempt)
    except (StoryGone, StoryMovedOn, StoryRejected) as error:
        reason = _trim(f"{reason}; the story refused the status: {error}")
    await _record(deps, storage.mark_final, event, lease_owner, status, reason)
    PORTRAITS_FINISHED.labels(status.value).inc()
    log.info("portrait.attempt_ended", extra={**ids, "status": status.value, "error": reason})
    return ack(status.value)


async def _give_up(
    event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, deliveries: int, reason: str
) -> Outcome:
    reason = f"gave up after {deliveries} deliveries: {reason}"
    log.error("portrait.retries_exhausted", extra=_ids(event, deliveries=deliveries, error=reason))
    # If even this fails, the consumer naks the last delivery; JetStream then announces it
    # as out of deliveries and end_abandoned_portrait records the failure later.
    return await _finish(event, lease_owner, deps, AttemptStatus.FAILED, reason)


def _budget_spent(claim: PortraitClaim, deps: PortraitDeps) -> bool:
    started = claim.create_time
    age = (datetime.now(started.tzinfo) - started).total_seconds()
    return age >= deps.provider_budget_seconds


async def _claim(deps: PortraitDeps, event: PortraitEvent, lease_owner: uuid.UUID) -> PortraitClaim:
    step = deps.timeouts.step_seconds
    async with deps.pool.acquire(timeout=step) as conn:
        return await storage.claim_portrait(
            conn, event.story_id, event.attempt, lease_owner, deps.lease.seconds, timeout=step
        )


async def _release(event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, reason: str) -> None:
    try:
        await _record(deps, storage.release_portrait, event, lease_owner, _trim(reason))
    except Exception as error:
        # The lease then simply expires; the redelivery comes after it.
        log.warning("portrait.release_failed", extra=_ids(event, error=_describe(error)))


async def _record(deps: PortraitDeps, write: Any, event: PortraitEvent, lease_owner: uuid.UUID, *args: Any) -> None:
    step = deps.timeouts.step_seconds
    async with deps.pool.acquire(timeout=step) as conn:
        updated = await write(conn, event.story_id, event.attempt, lease_owner, *args, timeout=step)
    if not updated:
        # Our lease ran out and another worker took over; its writes win.
        log.warning("portrait.lease_lost", extra=_ids(event, write=write.__name__))
        raise LeaseLost(f"{write.__name__}: the attempt is no longer ours")


@contextlib.contextmanager
def _step(step: str, ids: dict, **fields: Any) -> Iterator[None]:
    """Each pipeline step logs its start and its end (story_id, attempt, step, duration_ms,
    error) and is timed in casefile_portrait_step_seconds."""
    with logged_step(log, "portrait", step, ids, describe=_describe, observe=observe_step, **fields):
        yield


def _ids(event: PortraitEvent, **fields: Any) -> dict[str, Any]:
    return {"story_id": str(event.story_id), "attempt": event.attempt, **fields}


def _provider_name(deps: PortraitDeps) -> str:
    return getattr(deps.provider, "name", "unknown")


def _describe(error: BaseException) -> str:
    # Our own errors already read as sentences; anything else needs its type to make sense.
    if isinstance(error, (DependencyUnavailable, PortraitError, ProviderError, _ProviderTransient)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _trim(reason: str) -> str:
    reason = " ".join(reason.split()) or "unknown error"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."

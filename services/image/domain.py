"""Portraits and image URLs: rules and use cases. No grpc, no SQL text, no HTTP here."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from PIL import Image

from services.image import storage
from services.image.providers.base import (
    GeneratedImage,
    ImageProvider,
    ProviderError,
    ProviderNotConfigured,
    is_transient,
    retry_after_of,
)
from shared.retry import call_with_retries

log = logging.getLogger(__name__)

PORTRAIT_PREFIX = "portraits/"
PORTRAIT_SIDE = 1024
BLANK_PROMPT_REASON = "image_generation_prompt is blank"
# The story service accepts reasons of 1 to 1000 characters.
MAX_REASON_CHARS = 1000
MAX_STORAGE_ID_CHARS = 1024
DEFAULT_URL_SECONDS = 3600
MAX_URL_SECONDS = 604_800
# A live worker beats every ack_wait / 3: it tells JetStream it is still at work and pushes
# its lease forward, so it keeps a portrait for as long as the budget lets it run, while a
# dead one loses the message within one ack wait and the lease soon after.
DEFAULT_ACK_WAIT_SECONDS = 15.0
HEARTBEATS_PER_ACK_WAIT = 3
# The lease outlives the message's ack wait by this much: a live worker whose heartbeats
# stopped reaching NATS, but not the database, still turns a redelivery away (BUSY). Kept
# below the second redelivery delay (5 s by default) so that, after a crash, the delivery
# following the first BUSY finds the lease gone.
LEASE_MARGIN_SECONDS = 2.0
# Heartbeats stop this long after the attempt budget: every step after the provider is
# bounded too, so a worker still busy by then is stuck, and gives its portrait up the way
# a dead one would instead of holding it forever.
HOLD_MARGIN_SECONDS = 30.0
# A provider call started just before the budget ran out may finish with its own error,
# which says more than "timed out".
PROVIDER_CALL_GRACE_SECONDS = 5


class DomainError(Exception):
    """A use case refused or could not finish; handlers map each subclass to a status."""


class FieldError(DomainError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidArgument(FieldError):
    pass


class NotFound(FieldError):
    pass


class FailedPrecondition(DomainError):
    pass


class Unavailable(DomainError):
    """A dependency (S3, story, the database) is down; trying again later can help."""


class StoryRejected(DomainError):
    """The story service refused the call for good (no such story, malformed request)."""


# ---------------------------------------------------------------- ports


class PortraitObjects(Protocol):
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...
    async def exists(self, key: str) -> bool: ...
    async def presigned_get_url(self, key: str, expires_in: int) -> str: ...


class StoryPort(Protocol):
    async def set_story_image(self, story_id: str, storage_id: str) -> None: ...
    async def set_portrait_status(self, story_id: str, status: str, reason: str) -> None: ...


# ---------------------------------------------------------------- portraits


@dataclass(frozen=True)
class PortraitEvent:
    story_id: uuid.UUID
    prompt: str
    attempt: int


def portrait_event(story_id: str, prompt: str, attempt: int) -> PortraitEvent:
    """Validates a story.created event; InvalidArgument when it can never be painted."""
    try:
        parsed_id = uuid.UUID(story_id)
    except ValueError:
        raise InvalidArgument("story_id", "must be a UUID") from None
    if attempt < 0:
        raise InvalidArgument("portrait_attempt", "must not be negative")
    # proto3 sends 0 when a publisher leaves the field unset; that is the first attempt.
    return PortraitEvent(parsed_id, prompt, max(attempt, 1))


def heartbeat_interval(ack_wait_seconds: float) -> float:
    """How often a worker proves it is alive, to JetStream and to its lease."""
    return ack_wait_seconds / HEARTBEATS_PER_ACK_WAIT


def lease_seconds(ack_wait_seconds: float) -> float:
    """How long a lease lasts from its last renewal."""
    return ack_wait_seconds + LEASE_MARGIN_SECONDS


def longest_hold_seconds(budget_seconds: float) -> float:
    """How long heartbeats may keep one delivery of a portrait alive."""
    return budget_seconds + HOLD_MARGIN_SECONDS


def portrait_key(story_id: uuid.UUID) -> str:
    """Derived from the story alone: painting again overwrites the same object."""
    return f"{PORTRAIT_PREFIX}{story_id}.png"


class Disposition(enum.Enum):
    ACK = "ack"  # done for good (painted, skipped, failed and recorded, or already done)
    RETRY = "retry"  # a later delivery may succeed


@dataclass(frozen=True)
class PortraitOutcome:
    disposition: Disposition
    status: str  # READY, SKIPPED, FAILED, ALREADY_DONE, BUSY or RETRY
    reason: str | None = None


@dataclass(frozen=True)
class PortraitDeps:
    pool: Any  # an asyncpg pool: storage functions get one of its connections
    provider: ImageProvider
    objects: PortraitObjects
    stories: StoryPort
    budget_seconds: float = 60
    # The consumer's ack wait: the lease and its renewals follow it.
    ack_wait_seconds: float = DEFAULT_ACK_WAIT_SECONDS
    retry_first_delay: float = 1.0
    retry_max_delay: float = 16.0


class _TransientFailure(Exception):
    """This delivery cannot finish; the reason goes into the row and, at last, the story."""


async def paint_portrait(
    event: PortraitEvent, deps: PortraitDeps, *, final_delivery: bool
) -> PortraitOutcome:
    """Paints, stores and attaches one story's portrait, at most once per attempt."""
    lease_owner = uuid.uuid4()
    try:
        with _step("claim", event):
            claim = await _claim(deps, event, lease_owner)
    except Exception as error:
        return PortraitOutcome(Disposition.RETRY, "RETRY", _describe(error))
    if claim.status in storage.FINAL_STATUSES:
        log.info("portrait.already_done", extra=_ids(event, status=claim.status))
        return PortraitOutcome(Disposition.ACK, "ALREADY_DONE")
    if not claim.claimed:
        return _busy(event, final_delivery)
    try:
        async with _lease_kept(event, lease_owner, deps):
            return await _paint_claimed(event, claim, lease_owner, deps)
    except asyncio.CancelledError:
        # Shutting down: give the attempt back so the redelivery need not wait for the lease.
        await _release(event, lease_owner, deps, "interrupted by shutdown")
        raise
    except Exception as error:
        return await _after_failure(event, lease_owner, deps, error, claim.deliveries, final_delivery)


async def _after_failure(
    event: PortraitEvent,
    lease_owner: uuid.UUID,
    deps: PortraitDeps,
    error: Exception,
    deliveries: int,
    final_delivery: bool,
) -> PortraitOutcome:
    """A later delivery may succeed; on the last one the story learns it FAILED."""
    if not isinstance(error, _TransientFailure):
        # A bug or an unforeseen error: retried like a transient one, but loudly.
        log.exception("portrait.unexpected_error", extra=_ids(event, error=_describe(error)))
    reason = _describe(error)
    if final_delivery:
        return await _give_up(event, lease_owner, deps, deliveries, reason)
    await _release(event, lease_owner, deps, reason)
    return PortraitOutcome(Disposition.RETRY, "RETRY", reason)


async def _claim(deps: PortraitDeps, event: PortraitEvent, lease_owner: uuid.UUID) -> storage.PortraitClaim:
    seconds = lease_seconds(deps.ack_wait_seconds)
    async with deps.pool.acquire() as conn:
        return await storage.claim_portrait(conn, event.story_id, event.attempt, lease_owner, seconds)


@contextlib.asynccontextmanager
async def _lease_kept(event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps) -> AsyncIterator[None]:
    """Renews the lease while the body runs, and stops however the body ends."""
    renewing = asyncio.create_task(_renew_lease_periodically(event, lease_owner, deps), name="portrait-lease")
    try:
        yield
    finally:
        # Stopped before the final write or release, so no renewal races them.
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)


async def _renew_lease_periodically(event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps) -> None:
    interval = heartbeat_interval(deps.ack_wait_seconds)
    held_for = longest_hold_seconds(deps.budget_seconds)
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + held_for
    while True:
        await asyncio.sleep(interval)
        if loop.time() >= give_up_at:
            log.warning("portrait.lease_hold_limit", extra=_ids(event, held_seconds=held_for))
            return
        if not await _renew_lease(event, lease_owner, deps, timeout=interval):
            return


async def _renew_lease(
    event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, *, timeout: float
) -> bool:
    """False once the lease is no longer ours; a failed renewal is logged and tried again."""
    try:
        # Bounded, so that a hung database does not stretch the beat past the lease.
        async with asyncio.timeout(timeout), deps.pool.acquire() as conn:
            renewed = await storage.renew_lease(
                conn, event.story_id, event.attempt, lease_owner, lease_seconds(deps.ack_wait_seconds)
            )
    except Exception as error:
        log.warning("portrait.lease_renew_failed", extra=_ids(event, error=_describe(error)))
        return True
    if not renewed:
        log.warning("portrait.lease_lost", extra=_ids(event, write="renew_lease"))
    return renewed


def _busy(event: PortraitEvent, final_delivery: bool) -> PortraitOutcome:
    # Another worker holds this attempt (a duplicate event, or a second process); it owns
    # the outcome, so on the last delivery this copy simply steps aside.
    log.info("portrait.busy_elsewhere", extra=_ids(event, final_delivery=final_delivery))
    if final_delivery:
        return PortraitOutcome(Disposition.ACK, "BUSY")
    return PortraitOutcome(Disposition.RETRY, "BUSY", "another worker is painting this portrait")


async def _paint_claimed(
    event: PortraitEvent, claim: storage.PortraitClaim, lease_owner: uuid.UUID, deps: PortraitDeps
) -> PortraitOutcome:
    if not event.prompt.strip():
        log.warning("portrait.prompt_blank", extra=_ids(event))
        return await _finish(event, lease_owner, deps, "SKIPPED", BLANK_PROMPT_REASON)
    key = portrait_key(event.story_id)
    if not await _already_stored(event, claim, key, deps):
        try:
            image = await _generate(event, deps)
        except ProviderNotConfigured as error:
            log.error("portrait.provider_not_configured", extra=_ids(event, error=error.reason))
            return await _finish(event, lease_owner, deps, "FAILED", error.reason)
        except ProviderError as error:
            if error.transient:
                raise _TransientFailure(f"provider: {error.reason}") from error
            return await _finish(event, lease_owner, deps, "FAILED", f"provider: {error.reason}")
        await _upload(event, key, image, deps)
        await _record(deps, storage.mark_stored, event, lease_owner, key)
    return await _attach(event, lease_owner, key, deps)


async def _already_stored(
    event: PortraitEvent, claim: storage.PortraitClaim, key: str, deps: PortraitDeps
) -> bool:
    """A redelivery after the upload but before the story confirmed reuses the object."""
    if claim.status != "STORED" or claim.storage_id != key:
        return False
    with _step("check_stored", event, storage_id=key):
        stored = await _transient_on_unavailable(deps.objects.exists(key))
    event_name = "portrait.stored_object_found" if stored else "portrait.stored_object_missing"
    log.info(event_name, extra=_ids(event, storage_id=key))
    return stored


async def _generate(event: PortraitEvent, deps: PortraitDeps) -> GeneratedImage:
    def on_retry(error: BaseException, retry_number: int, delay: float) -> None:
        log.warning(
            "portrait.provider_retry",
            extra=_ids(event, retry=retry_number, delay_seconds=round(delay, 3), error=_describe(error)),
        )

    async def generate_once() -> GeneratedImage:
        return await deps.provider.generate(
            prompt=event.prompt, width=PORTRAIT_SIDE, height=PORTRAIT_SIDE
        )

    with _step("generate", event, provider=getattr(deps.provider, "name", "?")):
        try:
            # The retry budget bounds the waits; this bounds a provider call that hangs too.
            async with asyncio.timeout(deps.budget_seconds + PROVIDER_CALL_GRACE_SECONDS):
                return await call_with_retries(
                    generate_once,
                    budget_seconds=deps.budget_seconds,
                    first_delay=deps.retry_first_delay,
                    max_delay=deps.retry_max_delay,
                    is_transient=is_transient,
                    retry_after=retry_after_of,
                    on_retry=on_retry,
                )
        except TimeoutError:
            raise ProviderError(
                f"no image within the {deps.budget_seconds:g} s budget", transient=True
            ) from None


async def _upload(event: PortraitEvent, key: str, image: GeneratedImage, deps: PortraitDeps) -> None:
    with _step("upload", event, storage_id=key):
        data = await asyncio.to_thread(_as_png, image)
        await _transient_on_unavailable(deps.objects.put(key, data, "image/png"))


def _as_png(image: GeneratedImage) -> bytes:
    # The key ends in .png whatever the provider sent (Recraft answers WEBP), so the bytes do too.
    if image.content_type == "image/png":
        return image.data
    with Image.open(io.BytesIO(image.data)) as picture:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()


async def _attach(
    event: PortraitEvent, lease_owner: uuid.UUID, key: str, deps: PortraitDeps
) -> PortraitOutcome:
    try:
        with _step("attach", event, storage_id=key):
            await _transient_on_unavailable(deps.stories.set_story_image(str(event.story_id), key))
    except StoryRejected as error:
        # Nobody can be told (the story is gone or refuses): record it here and stop.
        await _record(deps, storage.mark_final, event, lease_owner, "FAILED", str(error))
        return PortraitOutcome(Disposition.ACK, "FAILED", str(error))
    await _record(deps, storage.mark_final, event, lease_owner, "READY", None)
    log.info("portrait.ready", extra=_ids(event, storage_id=key))
    return PortraitOutcome(Disposition.ACK, "READY")


async def _finish(
    event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, status: str, reason: str
) -> PortraitOutcome:
    """Tells the story the portrait is SKIPPED or FAILED, then records it here."""
    reason = _trim(reason)
    try:
        with _step("report_status", event, status=status, reason=reason):
            await _transient_on_unavailable(
                deps.stories.set_portrait_status(str(event.story_id), status, reason)
            )
    except StoryRejected as error:
        reason = _trim(f"{reason}; story refused the status: {error}")
    await _record(deps, storage.mark_final, event, lease_owner, status, reason)
    return PortraitOutcome(Disposition.ACK, status, reason)


async def _give_up(
    event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, deliveries: int, reason: str
) -> PortraitOutcome:
    reason = f"gave up after {deliveries} deliveries: {reason}"
    log.error("portrait.giving_up", extra=_ids(event, deliveries=deliveries, error=reason))
    try:
        return await _finish(event, lease_owner, deps, "FAILED", reason)
    except Exception as error:
        # No delivery is left to try again: the story keeps PENDING and an operator can
        # RetryPortrait. Acking is all that remains.
        log.error("portrait.failure_unrecorded", extra=_ids(event, error=_describe(error)))
        await _release(event, lease_owner, deps, reason)
        return PortraitOutcome(Disposition.ACK, "FAILED", reason)


async def _release(event: PortraitEvent, lease_owner: uuid.UUID, deps: PortraitDeps, reason: str) -> None:
    try:
        await _record(deps, storage.release_portrait, event, lease_owner, _trim(reason))
    except Exception as error:
        # The lease then simply expires; the redelivery comes after it.
        log.warning("portrait.release_failed", extra=_ids(event, error=_describe(error)))


async def _record(
    deps: PortraitDeps,
    write: Callable[..., Any],
    event: PortraitEvent,
    lease_owner: uuid.UUID,
    *args: Any,
) -> None:
    async with deps.pool.acquire() as conn:
        updated = await write(conn, event.story_id, event.attempt, lease_owner, *args)
    if not updated:
        # Our lease ran out and another worker took over; its writes win.
        log.warning("portrait.lease_lost", extra=_ids(event, write=write.__name__))


async def _transient_on_unavailable(call: Any) -> Any:
    try:
        return await call
    except Unavailable as error:
        raise _TransientFailure(str(error)) from error


@contextlib.contextmanager
def _step(step: str, event: PortraitEvent, **fields: Any) -> Iterator[None]:
    """One JSON line at the start, the success and the failure of each pipeline step."""
    log.info("portrait.step_started", extra=_ids(event, step=step, **fields))
    try:
        yield
    except Exception as error:
        log.warning("portrait.step_failed", extra=_ids(event, step=step, error=_describe(error), **fields))
        raise
    log.info("portrait.step_succeeded", extra=_ids(event, step=step, **fields))


def _ids(event: PortraitEvent, **fields: Any) -> dict[str, Any]:
    return {"story_id": str(event.story_id), "portrait_attempt": event.attempt, **fields}


def _describe(error: BaseException) -> str:
    # Our own errors already read as sentences; anything else needs its type to make sense.
    if isinstance(error, (DomainError, _TransientFailure, ProviderError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _trim(reason: str) -> str:
    reason = " ".join(reason.split()) or "unknown error"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


# ---------------------------------------------------------------- image URLs


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expire_time: datetime


async def image_url(
    objects: PortraitObjects,
    *,
    storage_id: str,
    user_id: str,
    expires_in_seconds: int,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SignedUrl:
    """A URL a client can open until expire_time; NotFound unless the object exists."""
    if not storage_id.strip():
        raise InvalidArgument("storage_id", "must not be empty")
    if len(storage_id) > MAX_STORAGE_ID_CHARS:
        raise InvalidArgument("storage_id", f"must be at most {MAX_STORAGE_ID_CHARS} characters")
    lifetime = _url_lifetime(expires_in_seconds)
    if user_id:
        # Generated images and their owners are not stored yet, so no user owns any.
        raise NotFound("storage_id", "no such image for this user")
    if not storage_id.startswith(PORTRAIT_PREFIX) or not await objects.exists(storage_id):
        raise NotFound("storage_id", "no such portrait")
    expire_time = now() + timedelta(seconds=lifetime)
    return SignedUrl(await objects.presigned_get_url(storage_id, lifetime), expire_time)


def _url_lifetime(expires_in_seconds: int) -> int:
    if expires_in_seconds == 0:
        return DEFAULT_URL_SECONDS
    if not 1 <= expires_in_seconds <= MAX_URL_SECONDS:
        raise InvalidArgument("expires_in_seconds", f"must be 0 (one hour) or 1 to {MAX_URL_SECONDS}")
    return expires_in_seconds

"""The run of one generation job, delivery by delivery. No grpc, no SQL text, no HTTP here.

A delivery of `image.job.queued` names a job; the row says everything else. One worker at
a time holds a job (a lease kept alive while it works; every write names it). Each run
resumes from where the last one stopped, slot by slot:

  PENDING -> PROCESSING: provider calls for the slots with no picture yet, as many calls
     as the model's per-call limit needs; each picture is kept in the database as soon as
     it exists, so a crash or a retry never pays the provider again for it.
  UPLOADING: per kept picture, storage reserved (idempotent per image), the object put in
     S3 (AES256, under users/<user>/jobs/<job>/<slot>.png), the slot DELIVERED. The
     pictures this delivery made go up from memory; only those an earlier one kept are
     read back from the database.
  COMPLETED (at least one image delivered) or FAILED; then the job is settled (refunds
     of what was not delivered for a reason that is not the player's, RecordGeneration)
     and only then is the message acknowledged.

Transient provider errors are retried as delayed redeliveries, 2 s, 4 s, 8 s (a longer
Retry-After wins), three at most; the fourth fails the remaining images with a refund.
Content refusals and invalid parameters fail them without one. S3, credits or the
database away only delay the job; a job still not final `job_max_seconds` after its
creation fails what is left, with a refund, so no job stays non-final forever.
A cancelled job (CancelGenerationJob clears the lease) stops before its next provider call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NoReturn

import asyncpg

from services.image.catalog import Quality, images_per_call
from services.image.durable_consumer import Outcome, ack, retry
from services.image.errors import DependencyUnavailable, LeaseLost
from services.image.jobs import edits, storage, wire
from services.image.jobs.domain import (
    ChargeNotFound,
    CreditsUnavailable,
    InsufficientCredits,
    JobDeps,
    JobKind,
    RefundExceedsCharge,
    StorageQuotaExceeded,
    charge_request_id,
    image_key,
    job_reference,
    settle_job,
)
from services.image.jobs.metrics import JOB_DELIVERIES, JOBS_FINISHED, count_refund, observe_step
from services.image.jobs.storage import JobRow, JobStatus, KeptPicture, SlotRow, SlotStatus
from services.image.lease import BatchedRenewals, LeaseTiming, lease_kept
from services.image.providers.base import (
    EditInstructions,
    GenerationProvider,
    GenerationRequest,
    GeneratedImage,
    GenerationResult,
    Preview,
    PreviewCallback,
    ProviderError,
)
from services.image.providers.pictures import as_png, preview_picture
from shared.logs import logged_step
from shared.metrics import PROVIDER_RETRIES, ProviderKind, ProviderOutcome, observe_provider_call, retry_reason

log = logging.getLogger(__name__)

# How many statement bounds a worker may wait for a pooled connection.
POOL_WAIT_STEPS = 6
_TRANSIENT = (DependencyUnavailable, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True)
class WorkerSettings:
    retry_backoff_seconds: tuple[float, ...] = (2.0, 4.0, 8.0)
    provider_seconds: float = 240.0
    job_max_seconds: float = 900.0
    # How soon a delivery that found the job held by another worker comes back.
    busy_retry_seconds: float = 1.0

    @property
    def max_retries(self) -> int:
        return len(self.retry_backoff_seconds)


@dataclass(frozen=True)
class WorkerDeps:
    jobs: JobDeps
    provider: GenerationProvider  # the ProviderRouter
    lease: LeaseTiming
    settings: WorkerSettings = WorkerSettings()
    # The process's leases renewed together (see lease.BatchedRenewals); None: one by one.
    renewals: BatchedRenewals | None = None


def batched_renewals(pool: Any, lease: LeaseTiming, step_seconds: float) -> BatchedRenewals:
    """One statement renews every job lease this process holds that is due. `pool` is the
    renewals' own: behind a thousand jobs' statements in the main pool's queue, a renewal
    could wait longer than the lease lasts."""

    async def renew_many(keys: list[tuple[uuid.UUID, uuid.UUID]]) -> set[tuple[uuid.UUID, uuid.UUID]]:
        async with pool.acquire(timeout=step_seconds) as conn:
            return await storage.renew_leases(conn, keys, lease.seconds, timeout=step_seconds)

    return BatchedRenewals(renew_many)


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None, label: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.label = label  # the retries metric's reason


async def run_job(deps: WorkerDeps, job_id: uuid.UUID) -> Outcome:
    """Advances one job as far as it goes now; the Outcome tells the consumer what next."""
    outcome = await _run(deps, job_id)
    JOB_DELIVERIES.labels(outcome.status).inc()
    return outcome


async def _run(deps: WorkerDeps, job_id: uuid.UUID) -> Outcome:
    ids = {"job_id": str(job_id)}
    owner = uuid.uuid4()
    try:
        claim = await _write(deps, storage.claim_job, job_id, owner, deps.lease.seconds, deps.jobs.settings.intent_seconds)
    except _TRANSIENT as error:
        return retry(_describe(error))
    if claim is not None and claim.claimed:
        deps.jobs.on_changed(job_id)
    if claim is None:
        log.warning("job.message_orphaned", extra=ids)
        return ack("UNKNOWN_JOB")
    row = claim.row
    ids["user_id"] = row.user_id
    if row.status is JobStatus.ABANDONED:
        return ack("ABANDONED")
    if row.status in storage.FINAL_STATUSES:
        return await _settle(deps, row, ids)
    if not claim.claimed:
        if row.status is JobStatus.CHARGING:
            # Its create may still be charging: look again once the intent is old enough.
            wait = max(deps.jobs.settings.intent_seconds - claim.age_seconds, 0.0) + 0.5
            return retry("the job is still being charged", delay_seconds=wait, status="CHARGING")
        log.info("job.already_claimed", extra=ids)
        return retry("another worker holds this job", delay_seconds=deps.settings.busy_retry_seconds, status="BUSY")
    work = _abandon(deps, row, owner, ids) if row.status in (JobStatus.CHARGING, JobStatus.ABANDONING) else _advance(
        deps, row, owner, ids
    )
    return await _under_lease(deps, job_id, owner, ids, work)


async def _under_lease(deps: WorkerDeps, job_id: uuid.UUID, owner: uuid.UUID, ids: dict, work: Any) -> Outcome:
    async def renew() -> bool:
        if deps.renewals is not None:
            return await deps.renewals.renew((job_id, owner))
        return await _write(deps, storage.renew_lease, job_id, owner, deps.lease.seconds)

    try:
        async with lease_kept(renew, deps.lease, log_fields=ids):
            done = await work
    except LeaseLost:
        # Cancelled meanwhile (the cancel cleared our lease), or another worker took over.
        return await _after_lease_lost(deps, job_id, ids)
    except asyncio.CancelledError:
        await _release(deps, job_id, owner, retried=False)
        raise
    except _TRANSIENT as error:
        await _release(deps, job_id, owner, retried=False)
        return retry(_describe(error))
    if isinstance(done, Outcome):
        return done
    # Final, and the lease given back with the final write: settling needs no lease (each
    # credits call is idempotent), and a renewal would now find the lease gone.
    if isinstance(done, Finished):
        return await _settle(deps, done.row, ids, done.slots)
    return await _settle(deps, done, ids)


async def _after_lease_lost(deps: WorkerDeps, job_id: uuid.UUID, ids: dict) -> Outcome:
    try:
        row = await _read(deps, job_id)
    except _TRANSIENT as error:
        return retry(_describe(error))
    if row is not None and row.status in storage.FINAL_STATUSES:
        return await _settle(deps, row, ids)
    return retry("the lease was lost; whoever holds the job now finishes it", status="LEASE_LOST")


# ---------------------------------------------------------------- a create that never came back


async def _abandon(deps: WorkerDeps, row: JobRow, owner: uuid.UUID, ids: dict) -> Outcome:
    """Refunds whatever the intent's charge took: the job never came to exist."""
    await _must(deps, storage.start_abandoning, row.job_id, owner)
    credits = deps.jobs.credits
    log.warning("job.intent_abandoned", extra={**ids, "charge_attempt": row.charge_attempt})
    try:
        # A replay returns the charge if there was one; if the create never reached
        # credits, this charges now, and the refund below gives it straight back.
        charged = await credits.charge(
            user_id=row.user_id, amount=row.credits_charged, reference=job_reference(row.job_id),
            request_id=charge_request_id(row.job_id, row.charge_attempt),
        )  # fmt: skip
    except InsufficientCredits:
        charged = None  # nothing was taken
    if charged is not None:
        try:
            await credits.refund(
                charge_id=charged.charge_id, amount=row.credits_charged, reason=f"job {row.job_id} was never created",
                request_id=f"{charge_request_id(row.job_id, row.charge_attempt)}:abandoned",
            )  # fmt: skip
        except RefundExceedsCharge as error:
            log.error("job.refund_refused", extra={**ids, "error": str(error)})
    refunded = row.credits_charged if charged is not None else 0
    count_refund("abandoned", refunded)
    await _must(deps, storage.finish_abandoning, row.job_id, owner, refunded, charged.charge_id if charged else None)
    log.info("job.intent_refunded", extra={**ids, "credits_refunded": refunded})
    return ack("ABANDONED")


# ---------------------------------------------------------------- the run


async def _advance(deps: WorkerDeps, row: JobRow, owner: uuid.UUID, ids: dict) -> Outcome | JobRow | Finished:
    if _past_deadline(deps, row):
        await _must(deps, storage.fail_slots, row.job_id, owner, None,
                    f"not finished within {deps.settings.job_max_seconds:g} s", refund=True)  # fmt: skip
        return await _finish(deps, row, owner, ids)
    slots = await _read_slots(deps, row.job_id)
    pending = [slot.slot for slot in slots if slot.status is SlotStatus.PENDING]
    # With nothing kept by an earlier delivery, this run's pictures are all there is to
    # upload: the last keep makes the job UPLOADING and they go up from memory, sparing
    # a statement that would read them back.
    run = _PaintRun(may_start_uploading=not any(slot.status is SlotStatus.GENERATED for slot in slots))
    if pending:
        try:
            stopped = await _paint(deps, row, owner, pending, ids, run)
        except _Transient as error:
            if row.retry_count < deps.settings.max_retries:
                return await _retry_provider(deps, row, owner, ids, error)
            await _give_up_painting(deps, row, owner, ids, error)
            stopped = None
        if stopped is not None:
            return stopped
    for slot, png in await _to_upload(deps, row, owner, slots, run):
        await _upload(deps, row, owner, slot, png, ids)
    return await _finish(deps, row, owner, ids)


@dataclass
class _PaintRun:
    """What this run's provider calls kept, and whether the last keep made the job UPLOADING."""

    may_start_uploading: bool
    kept: list[KeptPicture] = field(default_factory=list)
    uploading: bool = False


async def _to_upload(
    deps: WorkerDeps, row: JobRow, owner: uuid.UUID, slots: list[SlotRow], run: _PaintRun
) -> list[tuple[SlotRow, bytes]]:
    """The GENERATED slots with their pictures, the job UPLOADING: this run's from memory,
    or, when an earlier delivery kept some too, all of them read back from the database."""
    if run.uploading:
        by_slot = {slot.slot: slot for slot in slots}
        return [(replace(by_slot[picture.slot], status=SlotStatus.GENERATED, reserved_bytes=len(picture.png)), picture.png)
                for picture in run.kept]  # fmt: skip
    kept = await _write(deps, storage.start_uploading, row.job_id, owner)
    if kept is None:
        _lease_lost(row.job_id, storage.start_uploading)
    if kept:
        deps.jobs.on_changed(row.job_id)
    return kept


async def _paint(
    deps: WorkerDeps, row: JobRow, owner: uuid.UUID, pending: Sequence[int], ids: dict, run: _PaintRun
) -> Outcome | JobRow | None:
    """Provider calls for the `pending` slots, what they kept noted in `run`; the final job
    when it stopped (cancelled)."""
    spec = deps.jobs.catalog.get(row.model)
    start = 0
    edit: EditInstructions | None = None
    # A streamed call makes one image, so a job with previews knows whose preview each is.
    calls = images_per_call(spec, len(pending), streaming=_streams(deps, row))
    for call_number, count in enumerate(calls, start=1):
        group, rest = list(pending[start : start + count]), list(pending[start:])
        # A cancellation is looked for before every call but the first (the claim just read the job).
        latest = await _read(deps, row.job_id) if start else row
        start += count
        if latest is None or latest.status in storage.FINAL_STATUSES:
            log.info("job.stop_noticed", extra={**ids, "status": latest.status.value if latest else None})
            return latest if latest else ack("UNKNOWN_JOB")  # settled once out of the lease
        try:
            if edit is None and row.kind == JobKind.EDIT:
                edit = await _edit_inputs(deps, row, ids)
            result = await _generate(deps, row, group, ids, edit, on_preview=_preview_sender(deps, row, group))
        except ProviderError as error:
            # Refused for good: a user error (content policy, invalid parameters) is not
            # refunded; our side's (the vendor's quota, our key, an unusable answer) is.
            await _must(deps, storage.fail_slots, row.job_id, owner, group, f"provider: {error.reason}",
                        refund=error.refundable)  # fmt: skip
            # The later calls are not made (the same prompt would meet the same answer), and
            # what the player was never even tried for is given back.
            if unasked := rest[len(group):]:
                await _must(deps, storage.fail_slots, row.job_id, owner, unasked,
                            f"provider: not asked, after an earlier call was refused: {error.reason}", refund=True)  # fmt: skip
            return None
        await _keep(deps, row, owner, group, result, ids, run, last=call_number == len(calls))
    return None


async def _edit_inputs(deps: WorkerDeps, row: JobRow, ids: dict) -> EditInstructions:
    """The edit's source, mask and earlier turns, read once per run (S3 away: a retry)."""
    with _step("fetch_edit_inputs", ids):
        return await edits.edit_instructions(row, lambda read, *args: _write(deps, read, *args), deps.jobs.objects.get)


def _streams(deps: WorkerDeps, row: JobRow) -> bool:
    return bool(row.partial_images) and deps.jobs.previews is not None


def _preview_sender(deps: WorkerDeps, row: JobRow, group: list[int]) -> PreviewCallback | None:
    """Publishes each preview of the call for `group` (one slot when streaming), scaled
    down to a small JPEG. Never billed, never stored: it only passes to the watchers."""
    previews = deps.jobs.previews
    if not row.partial_images or previews is None or len(group) != 1:
        return None

    async def send(preview: Preview) -> None:
        data, width, height = await asyncio.to_thread(preview_picture, preview.image.data)
        payload = wire.preview_payload(image_index=group[0], preview_index=preview.index, data=data,
                                       content_type="image/jpeg", width=width, height=height)  # fmt: skip
        await previews.publish(row.job_id, payload)
        log.info("job.preview_sent", extra={"job_id": str(row.job_id), "slot": group[0], "preview_index": preview.index,
                                            "size_bytes": len(data)})  # fmt: skip

    return send


async def _generate(
    deps: WorkerDeps, row: JobRow, slots: Sequence[int], ids: dict, edit: EditInstructions | None = None, *,
    on_preview: PreviewCallback | None = None,
) -> GenerationResult:  # fmt: skip
    request = GenerationRequest(
        model=row.model, prompt=row.prompt, width=row.width, height=row.height, count=len(slots),
        quality=Quality(row.quality) if row.quality else None, edit=edit, partial_images=row.partial_images,
        image_numbers=tuple(slots),
    )  # fmt: skip
    with _step("generate", ids, images=len(slots)):
        started = time.perf_counter()
        outcome = ProviderOutcome.TRANSIENT_ERROR
        provider = "router"
        try:
            async with asyncio.timeout(deps.settings.provider_seconds):
                result = await deps.provider.generate(request, on_preview=on_preview)
            provider = str(result.provider)
            outcome = ProviderOutcome.OK
            return result
        except TimeoutError:
            raise _Transient(f"provider: no answer within {deps.settings.provider_seconds:g} s", None,
                             retry_reason(None, timed_out=True)) from None  # fmt: skip
        except ProviderError as error:
            provider = error.provider or provider
            if error.transient:
                raise _Transient(f"provider: {error.reason}", error.retry_after, retry_reason(error.status)) from error
            outcome = ProviderOutcome.PERMANENT_ERROR
            raise
        finally:
            observe_provider_call(ProviderKind.IMAGE, provider, outcome, time.perf_counter() - started)


async def _keep(
    deps: WorkerDeps, row: JobRow, owner: uuid.UUID, group: list[int], result: GenerationResult, ids: dict,
    run: _PaintRun, *, last: bool,
) -> None:  # fmt: skip
    pictures = []
    for slot, image in zip(group, result.images, strict=False):
        try:
            png = await _png_of(image)
        except Exception as error:  # noqa: BLE001 - Pillow raises many types for a corrupt file
            log.warning("job.image_rejected", extra={**ids, "slot": slot, "error": repr(error)})
            continue
        pictures.append(KeptPicture(slot, png, image.width, image.height))
    start_uploading = last and run.may_start_uploading and bool(run.kept or pictures)
    with _step("keep", ids, images=len(pictures)):
        await _must(deps, storage.keep_generated, row.job_id, owner, pictures, str(result.provider),
                    result.cost_microdollars, start_uploading=start_uploading)  # fmt: skip
    run.kept += pictures
    run.uploading = start_uploading
    missing = [slot for slot in group if slot not in {picture.slot for picture in pictures}]
    if missing:
        # The safety filter withheld them (the player's prompt): not refunded; an unreadable
        # answer is the provider's fault: refunded.
        withheld = result.refused_count > 0
        reason = result.refused_reason or ("withheld by the provider's safety filter" if withheld else "unreadable image")
        await _must(deps, storage.fail_slots, row.job_id, owner, missing, f"provider: {reason}", refund=not withheld)


async def _png_of(image: GeneratedImage) -> bytes:
    """The picture as PNG bytes. A provider's image was read and verified where it was made
    (pictures.image_from_bytes, or drawn by the local painter), so a PNG is kept as it is:
    opening and verifying it again cost a thread hop and a Pillow decode per picture."""
    if image.content_type == "image/png":
        return image.data
    return await asyncio.to_thread(as_png, image.data)


async def _retry_provider(deps: WorkerDeps, row: JobRow, owner: uuid.UUID, ids: dict, error: _Transient) -> Outcome:
    delay = max(deps.settings.retry_backoff_seconds[row.retry_count], error.retry_after or 0.0)
    PROVIDER_RETRIES.labels(ProviderKind.IMAGE, row.provider or "router", error.label).inc()
    await _release(deps, row.job_id, owner, retried=True)
    log.warning("job.provider_retried", extra={**ids, "retry_count": row.retry_count + 1, "delay_seconds": delay,
                                               "error": str(error)})  # fmt: skip
    return retry(str(error), delay_seconds=delay, status="PROVIDER_RETRY")


async def _give_up_painting(deps: WorkerDeps, row: JobRow, owner: uuid.UUID, ids: dict, error: _Transient) -> None:
    """The retries are spent: the images with no picture yet fail, refunded (the pictures
    already made are still delivered)."""
    reason = f"{error} (gave up after {row.retry_count} retries)"
    log.error("job.retries_exhausted", extra={**ids, "retry_count": row.retry_count, "error": reason})
    pending = [slot.slot for slot in await _read_slots(deps, row.job_id) if slot.status is SlotStatus.PENDING]
    await _must(deps, storage.fail_slots, row.job_id, owner, pending, reason, refund=True)


async def _upload(deps: WorkerDeps, row: JobRow, owner: uuid.UUID, slot: SlotRow, png: bytes, ids: dict) -> None:
    key = image_key(row.user_id, row.job_id, slot.slot)
    if slot.reserved_bytes is None:  # kept by a process older than keep_generated's marking
        await _must(deps, storage.mark_reserving, row.job_id, owner, slot.slot, len(png))
    try:
        with _step("reserve_storage", ids, slot=slot.slot, size_bytes=len(png)):
            await deps.jobs.credits.reserve_storage(
                user_id=row.user_id, size=len(png), request_id=f"image:{slot.image_id}:reserve"
            )
    except StorageQuotaExceeded as error:
        # Storage quota reached at upload: a server-side failure for the player, refunded.
        reason = f"storage: {error.what}; the image's credits are refunded"
        await _must(deps, storage.fail_slots, row.job_id, owner, [slot.slot], reason, refund=True)
        return
    with _step("upload", ids, slot=slot.slot, storage_id=key):
        # The same key always gets the same bytes (the picture kept for the slot), so a
        # second put after a crash rewrites nothing that differs: no existence check first.
        await deps.jobs.objects.put(key, png, "image/png", encrypted=True)
    with _step("mark_delivered", ids, slot=slot.slot, storage_id=key):
        await _must(deps, storage.mark_delivered, row.job_id, owner, slot.slot, key)


@dataclass(frozen=True)
class Finished:
    """A job this run made final, with its slots as they were when it did (no one changes
    the slots of a final job but its settling), so settling need not read them again."""

    row: JobRow
    slots: list[SlotRow]


async def _finish(deps: WorkerDeps, row: JobRow, owner: uuid.UUID, ids: dict) -> Finished:
    """The job made final (its lease released); the caller settles it outside the lease."""
    # Two statements, not five (a read, BEGIN, UPDATE, INSERT, COMMIT): the final row is
    # worked out here from what the read saw, and written with its event in one statement.
    read = await _write(deps, storage.finishing_job, row.job_id)
    if read is None:
        _lease_lost(row.job_id, storage.finishing_job)
    slots = read.slots
    delivered = [slot for slot in slots if slot.status is SlotStatus.DELIVERED]
    failed = [slot for slot in slots if slot.status is SlotStatus.FAILED]
    status = JobStatus.COMPLETED if delivered else JobStatus.FAILED
    error = ""
    if failed:
        first = failed[0].error or "failed"
        error = first if not delivered else f"{len(failed)} of {row.num_images} images failed: {first}"
    final = replace(read.row, status=status, error_message=error[:1000], complete_time=read.now, update_time=read.now)
    finished = await _must(deps, storage.finish_job, row.job_id, owner, read=read, final=final,
                           announce=wire.completed_event, delivered=delivered)  # fmt: skip
    deps.jobs.on_queued()  # whatever the final write queued leaves at once
    JOBS_FINISHED.labels(status.value).inc()
    log.info("job.finished", extra={**ids, "status": status.value, "images_delivered": len(delivered),
                                    "credits_refunded": finished.credits_refunded, "error": error or None})  # fmt: skip
    return Finished(finished, slots)


async def _settle(deps: WorkerDeps, row: JobRow, ids: dict, slots: list[SlotRow] | None = None) -> Outcome:
    try:
        with _step("settle", ids):
            await settle_job(deps.jobs, row, slots)
    except (CreditsUnavailable, *_TRANSIENT) as error:
        return retry(f"settling: {_describe(error)}", status="SETTLE_RETRY")
    except ChargeNotFound as error:
        log.error("job.settle_refused", extra={**ids, "error": str(error)})
    return ack(row.status.value)


def _past_deadline(deps: WorkerDeps, row: JobRow) -> bool:
    age = (datetime.now(row.create_time.tzinfo) - row.create_time).total_seconds()
    return age >= deps.settings.job_max_seconds


# ---------------------------------------------------------------- plumbing


async def _write(deps: WorkerDeps, write: Any, *args: Any, **kwargs: Any) -> Any:
    step = deps.jobs.settings.step_seconds
    # A thousand jobs in flight queue for the pool: waiting there is not a fault (the lease
    # is renewed on its own pool meanwhile), so the wait is bounded far above one statement.
    async with deps.jobs.pool.acquire(timeout=step * POOL_WAIT_STEPS) as conn:
        return await write(conn, *args, timeout=step, **kwargs)


async def _must(deps: WorkerDeps, write: Any, *args: Any, **kwargs: Any) -> Any:
    """A write under our lease; LeaseLost when the job is no longer ours (cancelled, taken over)."""
    result = await _write(deps, write, *args, **kwargs)
    if not result:
        _lease_lost(args[0], write)
    deps.jobs.on_changed(args[0])
    return result


def _lease_lost(job_id: uuid.UUID, write: Any) -> NoReturn:
    log.warning("job.lease_lost", extra={"job_id": str(job_id), "write": write.__name__})
    raise LeaseLost(f"{write.__name__}: the job is no longer ours")


async def _read(deps: WorkerDeps, job_id: uuid.UUID) -> JobRow | None:
    return await _write(deps, storage.get_job, job_id)


async def _read_slots(deps: WorkerDeps, job_id: uuid.UUID) -> list[SlotRow]:
    return await _write(deps, storage.job_slots, job_id)


async def _release(deps: WorkerDeps, job_id: uuid.UUID, owner: uuid.UUID, *, retried: bool) -> None:
    try:
        await _write(deps, storage.release_job, job_id, owner, retried=retried)
        deps.jobs.on_changed(job_id)
    except Exception as error:  # noqa: BLE001 - the lease then simply expires
        log.warning("job.release_failed", extra={"job_id": str(job_id), "error": _describe(error)})


# Steps that wait on another system for long enough that "started" tells an operator
# where a job is; the others (a statement, a credits call) log only their end, which
# carries the duration and the error: two lines each of those were a seventh of a job's CPU.
_STEPS_LOGGING_START = frozenset({"fetch_edit_inputs", "generate", "upload"})
# Steps whose success another line already tells (the upload's end, job.finished, job.settled):
# they log only a failure (their duration is still in the metric). A job's log lines were a
# tenth of its CPU in the image process with a thousand jobs in flight.
_STEPS_LOGGING_ONLY_FAILURE = frozenset({"keep", "mark_delivered", "settle"})


@contextlib.contextmanager
def _step(step: str, ids: dict, **fields: Any) -> Iterator[None]:
    """Each step logs its end (job_id, step, duration_ms, error), the long ones their start
    too, those another line speaks for only a failure; each is timed in casefile_job_step_seconds."""
    with logged_step(log, "job", step, ids, describe=_describe, observe=observe_step,
                     log_start=step in _STEPS_LOGGING_START, log_success=step not in _STEPS_LOGGING_ONLY_FAILURE,
                     **fields):  # fmt: skip
        yield


def _describe(error: BaseException) -> str:
    if isinstance(error, (DependencyUnavailable, ProviderError, _Transient)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"

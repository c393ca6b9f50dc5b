"""Generation jobs: rules and the request-side use cases. No grpc, no SQL text, no HTTP here.

Money first. CreateGenerationJob charges the player before anything else happens, and a
crash must never keep the money without a job:

1. The job id is derived from (user_id, request_id), so every repeat of a request, and
   every process, names the same job. The credits request_id of the charge is
   `job:<job_id>:<charge_attempt>` and its reference `job:<job_id>`.
2. Before the charge, one transaction writes the job as an intent (CHARGING, never shown
   to callers) and its queue message, held back for `intent_seconds`.
3. The charge. Credits makes it once however many repeats race (20 at once charge once).
4. One transaction makes the job PENDING with the charge and releases the message at once.

If the process dies between 3 and 4, the held message is released after the bound anyway;
the worker that receives it finds the job still CHARGING, replays the charge (idempotent:
it returns the charge if there was one) and refunds it in full (ABANDONING, then
ABANDONED): the money comes back and no job is shown. A repeat of the request that arrives
later revives the job under the next charge attempt. Every outcome of a charge is thus
either a job that shows it or a full refund of it.

After a job is final, the credits it owes (a refund per image not delivered for a reason
that is not the player's, and RecordGeneration once) are settled by whoever gets there
first, the worker or CancelGenerationJob, each call keyed by a request_id derived from
the job and the image, so nothing is refunded twice. A job is acknowledged on the queue
only once settled, so a credits outage only delays the refunds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from services.image.catalog import (
    CATALOG,
    MAX_IMAGES_PER_JOB,
    EditOperation,
    ModelCatalog,
    Quality,
    UnsupportedRequest,
    price_units,
)
from services.image.errors import DependencyUnavailable
from services.image.jobs import edits, storage, wire
from services.image.jobs.metrics import JOBS_CANCELLED, JOBS_CREATED, count_refund
from services.image.jobs.storage import JobRow, JobStatus, SlotRow, SlotStatus
from services.image.providers.pictures import mask_problem
from shared.change_feed import WatcherLimitReached
from shared import page_tokens
from shared.validation import id_problem, optional_id_problem, text_problem

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 4000
# OpenAI's bound on partial_images.
MAX_PARTIAL_IMAGES = 3
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Fixed forever: job ids of requests already made depend on it.
JOB_ID_NAMESPACE = uuid.UUID("4f0b8a59-7c33-4d1e-9a57-1d2b7e9c6a10")
USER_IMAGE_PREFIX = "users/"


class JobKind(enum.StrEnum):
    GENERATE = "GENERATE"
    EDIT = "EDIT"


# ---------------------------------------------------------------- errors


class JobError(Exception):
    """A job request refused; handlers map each subclass to a status."""


class InvalidJobRequest(JobError):
    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in violations))
        self.violations = tuple(violations)


class RequestIdReused(JobError):
    def __init__(self) -> None:
        super().__init__("request_id: already used for a job with other arguments; send a new request_id")
        self.field = "request_id"
        self.problem = "already used for a job with other arguments"


class JobNotFound(JobError):
    def __init__(self) -> None:
        super().__init__("job_id: no such job for this user")


class ImageNotFound(JobError):
    def __init__(self) -> None:
        super().__init__("image_id: no such image for this user")


class ParentJobNotFound(JobNotFound):
    """parent_job_id names no job of this user's (ErrorInfo metadata `field` says which id)."""

    def __init__(self) -> None:
        JobError.__init__(self, "parent_job_id: no such job for this user; nothing was charged")
        self.metadata = {"field": "parent_job_id"}


class SourceImageNotFound(ImageNotFound):
    """source_image_id names no image of this user's."""

    def __init__(self) -> None:
        JobError.__init__(self, "source_image_id: no such image for this user; nothing was charged")
        self.metadata = {"field": "source_image_id"}


class JobAlreadyFinished(JobError):
    def __init__(self, status: JobStatus) -> None:
        super().__init__(f"the job is already {status.value}; only a PENDING or running job can be cancelled")
        self.metadata = {"status": status.value}


class TooManyWatchers(JobError):
    retry_after_seconds = 5.0

    def __init__(self, limit: int) -> None:
        super().__init__(f"this process already streams {limit} jobs; retry shortly or poll GetGenerationJob")


class InsufficientCredits(JobError):
    def __init__(self, *, balance: int, cost: int) -> None:
        super().__init__(f"the balance {balance} is short of the job's price {cost}; nothing was charged")
        self.metadata = {"balance": str(balance), "cost": str(cost)}


class StorageQuotaExceeded(JobError):
    def __init__(self, *, used: int, quota: int) -> None:
        # What happened, without what it cost: at create nothing was charged, at upload the
        # image was and is refunded (the worker says so).
        self.what = f"the storage quota is used up ({used} of {quota} bytes)"
        super().__init__(f"{self.what}; nothing was charged")
        self.metadata = {"used": str(used), "quota": str(quota)}


class ChargeRateLimited(JobError):
    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(f"too many charges; retry in {retry_after_seconds:g} s with the same request_id")
        self.retry_after_seconds = retry_after_seconds
        self.metadata = {"retry_after_seconds": f"{retry_after_seconds:g}"}


class CreditsUnavailable(DependencyUnavailable):
    """The credits service did not answer; the call may be repeated with the same request_id."""

    def __init__(self, message: str, *, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        if retry_after_seconds is not None:
            self.retry_after_seconds = retry_after_seconds


class CreditsRefusedRequest(CreditsUnavailable):
    """Credits refused our own call as malformed or not ours to make: an operator must act."""


class RefundExceedsCharge(Exception):
    """Credits says the charge is refunded already, beyond what this refund asks."""


class ChargeNotFound(Exception):
    """Credits knows no such charge (a bug: jobs only refund charges they made)."""


class JobBeingRefunded(DependencyUnavailable):
    """A repeat found its interrupted request being refunded; it can come again in a moment."""

    def __init__(self) -> None:
        super().__init__("an interrupted attempt of this request is being refunded; retry with the same request_id")


# ---------------------------------------------------------------- ports


@dataclass(frozen=True)
class Account:
    balance: int
    storage_used_bytes: int
    storage_quota_bytes: int


@dataclass(frozen=True)
class Charged:
    charge_id: str
    balance: int


class Credits(Protocol):
    async def get_account(self, user_id: str) -> Account: ...
    async def charge(self, *, user_id: str, amount: int, reference: str, request_id: str) -> Charged: ...
    async def refund(self, *, charge_id: str, amount: int, reason: str, request_id: str) -> int: ...
    async def reserve_storage(self, *, user_id: str, size: int, request_id: str) -> None: ...
    async def release_storage(self, *, user_id: str, size: int, request_id: str) -> None: ...
    async def record_generation(
        self, *, user_id: str, job_id: str, model: str, requested: int, delivered: int, bytes_stored: int
    ) -> None: ...


class Models(Protocol):
    """Who serves a model now (routing.ProviderRouter)."""

    def provider_for(self, model: str, provider: Any = None) -> Any: ...


class JobObjects(Protocol):
    async def put(self, key: str, data: bytes, content_type: str, *, encrypted: bool = False) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def delete(self, key: str) -> None: ...


class JobChanges(Protocol):
    def watch(self, key: str) -> contextlib.AbstractAsyncContextManager[Any]: ...


class JobPreviews(Protocol):
    """Where previews pass from the worker to the watchers (jobs.previews: core NATS)."""

    async def publish(self, job_id: uuid.UUID, payload: bytes) -> None: ...
    def watch(self, job_id: uuid.UUID) -> contextlib.AbstractAsyncContextManager[asyncio.Queue[bytes]]: ...


@dataclass(frozen=True)
class JobSettings:
    # A CHARGING intent older than this is taken to be a create that never came back.
    intent_seconds: float = 60.0
    step_seconds: float = 10.0
    watch_max_seconds: float = 900.0
    # How long a watcher trusts the change feed before reading the job anyway.
    watch_recheck_seconds: float = 10.0


@dataclass(frozen=True)
class JobDeps:
    pool: Any  # an asyncpg pool
    credits: Credits
    models: Models
    objects: JobObjects
    settings: JobSettings = JobSettings()
    catalog: ModelCatalog = CATALOG
    # Called after a commit that made a queue message available, so the relays publish at once.
    on_queued: Callable[[], None] = lambda: None
    # Called after a commit that changed a job, so its watchers (in every process) read it
    # again. Not a trigger: a NOTIFY inside the transaction serializes commits (shared/notices.py).
    on_changed: Callable[[uuid.UUID], None] = lambda _job_id: None
    # Live previews of jobs that ask for them (None: no previews are sent).
    previews: JobPreviews | None = None


# ---------------------------------------------------------------- what callers see


@dataclass(frozen=True)
class JobImage:
    image_id: str
    storage_id: str
    content_type: str
    size_bytes: int
    width: int
    height: int


@dataclass(frozen=True)
class Job:
    row: JobRow
    images: tuple[JobImage, ...]

    @property
    def status(self) -> JobStatus:
        return self.row.status

    @property
    def final(self) -> bool:
        return self.row.status in storage.FINAL_STATUSES

    @property
    def processing_time_ms(self) -> int:
        return wire.processing_time_ms(self.row)


@dataclass(frozen=True)
class Created:
    job: Job
    credits_remaining: int
    replayed: bool = False


@dataclass(frozen=True)
class JobRequest:
    user_id: str
    request_id: str
    prompt: str
    model: str
    width: int
    height: int
    num_images: int
    quality: Quality | None = None
    kind: JobKind = JobKind.GENERATE
    project_id: str = ""
    parent_job_id: str = ""
    # Fields of EDIT jobs (issue 9); a GENERATE job must leave them empty.
    source_image_id: str = ""
    edit_operation: EditOperation | None = None
    mask: bytes = b""
    canvas_id: str = ""
    # Previews per image while it forms, 0 to 3 (models that stream only).
    partial_images: int = 0


@dataclass(frozen=True)
class JobPage:
    jobs: tuple[Job, ...]
    next_page_token: str


@dataclass(frozen=True)
class JobStats:
    counts: dict[JobStatus, int]
    total: int
    success_rate: float
    credits_charged: int
    credits_refunded: int
    average_processing_time_ms: int
    # What the providers say the jobs cost us, in millionths of a dollar.
    provider_cost_microdollars: int = 0


# ---------------------------------------------------------------- create


def job_id_for(user_id: str, request_id: str) -> uuid.UUID:
    # The separator cannot occur in either (ids have no control characters).
    return uuid.uuid5(JOB_ID_NAMESPACE, f"{user_id}\x1f{request_id}")


def charge_request_id(job_id: uuid.UUID, attempt: int) -> str:
    return f"job:{job_id}:{attempt}"


def job_reference(job_id: uuid.UUID) -> str:
    return f"job:{job_id}"


def image_key(user_id: str, job_id: uuid.UUID, slot: int) -> str:
    """Where a job's image lives in S3: under the user, so a bucket policy can scope by it."""
    return f"{USER_IMAGE_PREFIX}{user_folder(user_id)}/jobs/{job_id}/{slot}.png"


# A folder name no object store mangles: no separator, not '.' or '..', and short enough for
# one file name on a store that keeps objects as files (255 bytes).
_MAX_FOLDER_BYTES = 128


def user_folder(user_id: str) -> str:
    """The user's folder in the bucket: the id itself (what every usual id is), else '!'
    and a digest of it. A valid id such as 'a//b', '..' or 128 'ü' (256 bytes) would make a
    key that S3 stores under another name or a store refuses, and the job would wait out
    its upload retries. '!' (one of S3's safe key characters) is never in a folder used as
    is, so the two kinds never meet."""
    plain = not any(char in user_id for char in "/\\!") and user_id not in (".", "..")
    if plain and len(user_id.encode()) <= _MAX_FOLDER_BYTES:
        return user_id
    return "!" + hashlib.sha256(user_id.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class CheckedRequest:
    request: JobRequest
    job_id: uuid.UUID
    unit_price: int
    price: int
    digest: str
    parent_job_id: uuid.UUID | None
    # Set by the checks against the database (_place): the job's chain and its source.
    lineage: edits.Lineage | None = None
    source_image_id: uuid.UUID | None = None


def check_request(request: JobRequest, models: Models, catalog: ModelCatalog = CATALOG) -> CheckedRequest:
    """Every rule a request must meet, before any call or charge; InvalidJobRequest names each field."""
    problems = _field_problems(request)
    if not problems:
        problems = _model_problems(request, models, catalog)
    if problems:
        raise InvalidJobRequest(problems)
    spec = catalog.get(request.model)
    price = price_units(spec, width=request.width, height=request.height, num_images=request.num_images,
                        quality=request.quality)  # fmt: skip
    return CheckedRequest(
        request=request,
        job_id=job_id_for(request.user_id, request.request_id),
        unit_price=price // request.num_images,
        price=price,
        digest=_digest(request),
        parent_job_id=uuid.UUID(request.parent_job_id) if request.parent_job_id else None,
    )


def _field_problems(request: JobRequest) -> list[tuple[str, str]]:
    prompt_required = request.kind is not JobKind.EDIT or request.edit_operation not in edits.OPERATIONS_WITHOUT_PROMPT
    checks = [
        ("user_id", id_problem(request.user_id)),
        ("request_id", id_problem(request.request_id)),
        ("prompt", text_problem(request.prompt, max_chars=MAX_PROMPT_CHARS, allowed_controls="\n\t",
                                required=prompt_required)),  # fmt: skip
        ("model", id_problem(request.model)),
        ("num_images", None if 1 <= request.num_images <= MAX_IMAGES_PER_JOB else f"must be 1 to {MAX_IMAGES_PER_JOB}"),
        ("width", None if request.width > 0 else "must be positive"),
        ("height", None if request.height > 0 else "must be positive"),
        ("project_id", optional_id_problem(request.project_id)),
        ("parent_job_id", _optional_uuid_problem(request.parent_job_id)),
        ("canvas_id", optional_id_problem(request.canvas_id)),
        ("partial_images", None if 0 <= request.partial_images <= MAX_PARTIAL_IMAGES
                           else f"must be 0 to {MAX_PARTIAL_IMAGES}"),  # fmt: skip
    ]
    if request.kind is JobKind.EDIT:
        checks += edits.edit_field_problems(
            source_image_id=request.source_image_id, operation=request.edit_operation, mask=request.mask,
            parent_job_id=request.parent_job_id,
        )  # fmt: skip
    else:
        checks += [
            ("source_image_id", "only EDIT jobs take a source image" if request.source_image_id else None),
            ("edit_operation", "only EDIT jobs take an edit operation" if request.edit_operation else None),
            ("mask", "only EDIT jobs take a mask" if request.mask else None),
        ]
    return [(name, problem) for name, problem in checks if problem is not None]


def _model_problems(request: JobRequest, models: Models, catalog: ModelCatalog) -> list[tuple[str, str]]:
    try:
        catalog.check(
            request.model, width=request.width, height=request.height, num_images=request.num_images,
            quality=request.quality, prompt=request.prompt,
            operation=request.edit_operation if request.kind is JobKind.EDIT else None,
        )  # fmt: skip
        models.provider_for(request.model)
    except UnsupportedRequest as error:
        return [(error.field, error.problem)]
    if request.partial_images and not catalog.get(request.model).supports_stream:
        return [("partial_images", f"{request.model} cannot stream previews (Model.supports_stream); send 0")]
    return []


def _optional_uuid_problem(value: str) -> str | None:
    if not value:
        return None
    try:
        uuid.UUID(value)
    except ValueError:
        return "must be a job_id (a UUID)"
    return None if str(uuid.UUID(value)) == value.lower() else "must be a job_id (a UUID)"


def _digest(request: JobRequest) -> str:
    arguments = {
        "prompt": request.prompt, "model": request.model, "width": request.width, "height": request.height,
        "num_images": request.num_images, "quality": request.quality.value if request.quality else None,
        "kind": request.kind.value, "project_id": request.project_id,
        "parent_job_id": _canonical_uuid(request.parent_job_id),
    }  # fmt: skip
    # The editor's fields join only when given, so requests made before they existed keep their digests.
    editor = {
        "source_image_id": _canonical_uuid(request.source_image_id), "canvas_id": request.canvas_id,
        "edit_operation": request.edit_operation.value if request.edit_operation else "",
        "mask": hashlib.sha256(request.mask).hexdigest() if request.mask else "",
        "partial_images": request.partial_images,
    }  # fmt: skip
    arguments.update({name: value for name, value in editor.items() if value})
    return hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()


def _canonical_uuid(value: str) -> str:
    """A UUID as the job stores it (lower case, hyphens), so a retry that spells the same id
    another way is the same request; '' or an id already refused stays as given."""
    try:
        return str(uuid.UUID(value)) if value else value
    except ValueError:
        return value


async def create_job(deps: JobDeps, request: JobRequest) -> Created:
    """Validates, checks the storage quota, charges once and records a PENDING job (see the module doc)."""
    try:
        created = await _create(deps, request)
    except Exception as error:
        JOBS_CREATED.labels(type(error).__name__).inc()
        raise
    JOBS_CREATED.labels("replayed" if created.replayed else "created").inc()
    return created


async def _create(deps: JobDeps, request: JobRequest) -> Created:
    checked = check_request(request, deps.models, deps.catalog)
    # The quota is read while the row is: a new request (the usual case) waits for one
    # round trip, not two; a replay has read the account for nothing, which is cheap.
    existing, account = await _gather(_read_row(deps, checked.job_id), deps.credits.get_account(request.user_id))
    if existing is not None:
        replay = await _replay(deps, checked, existing)
        if replay is not None:
            return replay
    else:
        checked = await _place(deps, checked, await _check_parent(deps, checked))
    _check_storage_quota(account)
    # Each pass either answers or sees a change a twin made (an insert, a commit, a
    # revival), so a few passes always suffice.
    row = existing
    for _ in range(5):
        attempt = await _intent_attempt(deps, checked, row)
        if isinstance(attempt, Created):
            return attempt
        charged = await _charge(deps, checked, attempt)
        job = await _commit(deps, checked, attempt, charged)
        if job is not None:
            deps.on_queued()
            log.info("job.created", extra=_ids(checked, status=job.status.value, credits_charged=checked.price))
            return Created(job, charged.balance)
        row = await _read_row(deps, checked.job_id)
    raise JobBeingRefunded()


async def _replay(deps: JobDeps, checked: CheckedRequest, row: JobRow) -> Created | None:
    """The first answer again when the job exists; None when the request must (re)charge."""
    if row.request_digest != checked.digest:
        raise RequestIdReused()
    if row.status in storage.VISIBLE_STATUSES:
        log.info("job.request_replayed", extra=_ids(checked, status=row.status.value))
        return Created(await _job(deps, row), row.balance_after or 0, replayed=True)
    if row.status is JobStatus.ABANDONING:
        raise JobBeingRefunded()
    return None


async def _intent_attempt(deps: JobDeps, checked: CheckedRequest, row: JobRow | None) -> int | Created:
    """The charge attempt this request charges under, writing or reviving its intent
    (`row`: the job as just read)."""
    if row is None:
        inserted = await _write(deps, storage.insert_intent, checked_row(checked), deps.settings.intent_seconds)
        return 1 if inserted else await _intent_attempt(deps, checked, await _read_row(deps, checked.job_id))
    replay = await _replay(deps, checked, row)
    if replay is not None:
        return replay
    if row.status is JobStatus.ABANDONED:
        revived = await _change(deps, storage.revive_intent, row.job_id, row.charge_attempt, deps.settings.intent_seconds)
        if revived:
            log.info("job.intent_revived", extra=_ids(checked, charge_attempt=row.charge_attempt + 1))
        return await _intent_attempt(deps, checked, await _read_row(deps, checked.job_id))
    return row.charge_attempt


async def _charge(deps: JobDeps, checked: CheckedRequest, attempt: int) -> Charged:
    request = checked.request
    try:
        return await deps.credits.charge(
            user_id=request.user_id, amount=checked.price, reference=job_reference(checked.job_id),
            request_id=charge_request_id(checked.job_id, attempt),
        )  # fmt: skip
    except InsufficientCredits:
        # Credits remembers this refusal for this request_id, so every twin gets it too:
        # the intent ends here, and a later repeat charges under the next attempt.
        await _change(deps, storage.drop_refused_intent, checked.job_id, attempt)
        log.info("job.charge_refused", extra=_ids(checked, charge_attempt=attempt))
        raise
    except (ChargeRateLimited, CreditsUnavailable) as error:
        # Nothing is known to be charged; the intent and its held message stay, so a repeat
        # resumes it and a create that is never repeated is refunded by a worker.
        log.warning("job.charge_failed", extra=_ids(checked, charge_attempt=attempt, error=str(error)))
        raise


async def _commit(deps: JobDeps, checked: CheckedRequest, attempt: int, charged: Charged) -> Job | None:
    row = await _change(deps, storage.commit_charged_job, checked.job_id, attempt, charged.charge_id, charged.balance)
    return Job(row, ()) if row is not None else None  # a job just made PENDING has no image yet


def checked_row(checked: CheckedRequest) -> storage.NewJob:
    request = checked.request
    lineage = checked.lineage
    return storage.NewJob(
        job_id=checked.job_id,
        user_id=request.user_id,
        request_id=request.request_id,
        request_digest=checked.digest,
        kind=request.kind.value,
        model=request.model,
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        num_images=request.num_images,
        quality=request.quality.value if request.quality else None,
        project_id=request.project_id or None,
        parent_job_id=checked.parent_job_id,
        unit_price=checked.unit_price,
        credits_charged=checked.price,
        source_image_id=checked.source_image_id,
        edit_operation=request.edit_operation.value if request.kind is JobKind.EDIT and request.edit_operation else None,
        canvas_id=request.canvas_id or None,
        root_job_id=lineage.root_job_id if lineage else checked.job_id,
        chain_depth=lineage.chain_depth if lineage else 0,
        mask=request.mask or None,
        partial_images=request.partial_images,
    )


async def _check_parent(deps: JobDeps, checked: CheckedRequest) -> JobRow | None:
    if checked.parent_job_id is None:
        return None
    parent = await _read_row(deps, checked.parent_job_id)
    if parent is None or parent.user_id != checked.request.user_id or parent.status not in storage.VISIBLE_STATUSES:
        raise ParentJobNotFound()
    return parent


async def _place(deps: JobDeps, checked: CheckedRequest, parent: JobRow | None) -> CheckedRequest:
    """The checks that read the database, before the charge: the chain's depth, and for an
    EDIT its source (the user's own image) and the mask against the source's size."""
    lineage = edits.lineage_under(parent, checked.job_id)
    if isinstance(lineage, str):
        raise InvalidJobRequest([("parent_job_id", lineage)])
    request = checked.request
    if request.kind is not JobKind.EDIT:
        return replace(checked, lineage=lineage)
    if request.source_image_id:
        async with _connection(deps) as conn:
            source = await storage.user_image(conn, uuid.UUID(request.source_image_id), request.user_id,
                                              timeout=deps.settings.step_seconds)  # fmt: skip
        if source is None:
            raise SourceImageNotFound()
    else:  # the edit continues from the parent's picture
        assert parent is not None
        async with _connection(deps) as conn:
            source = await storage.first_image(conn, parent.job_id, timeout=deps.settings.step_seconds)
        if source is None:
            raise InvalidJobRequest([("source_image_id", "the parent job has no image (yet): name the image to edit")])
    problem = edits.source_problem(deps.catalog.get(request.model), source)
    if problem is not None:
        raise InvalidJobRequest([("source_image_id", problem)])
    if request.mask:
        problem = await asyncio.to_thread(mask_problem, request.mask, source.width, source.height)
        if problem is not None:
            raise InvalidJobRequest([("mask", problem)])
    return replace(checked, lineage=lineage, source_image_id=source.image_id)


def _check_storage_quota(account: Account) -> None:
    if account.storage_used_bytes >= account.storage_quota_bytes:
        raise StorageQuotaExceeded(used=account.storage_used_bytes, quota=account.storage_quota_bytes)


# ---------------------------------------------------------------- read, list, watch


def parse_job_id(job_id: str, field_name: str = "job_id") -> uuid.UUID:
    problem = id_problem(job_id)
    if problem is None:
        try:
            return uuid.UUID(job_id)
        except ValueError:
            problem = f"must be {'an' if field_name[0] in 'aeiou' else 'a'} {field_name} (a UUID)"
    raise InvalidJobRequest([(field_name, problem)])


def _check_user(user_id: str) -> None:
    problem = id_problem(user_id)
    if problem is not None:
        raise InvalidJobRequest([("user_id", problem)])


async def get_job(deps: JobDeps, *, job_id: str, user_id: str) -> Job:
    _check_user(user_id)
    parsed = parse_job_id(job_id)
    row = await _read_row(deps, parsed)
    if row is None or row.user_id != user_id or row.status not in storage.VISIBLE_STATUSES:
        raise JobNotFound()
    return await _job(deps, row)


async def list_jobs(
    deps: JobDeps, *, user_id: str, status: JobStatus | None, page_size: int, page_token: str,
    project_id: str = "", canvas_id: str = "", root_job_id: str = "",
) -> JobPage:  # fmt: skip
    """The user's jobs, newest first; project_id, canvas_id and root_job_id (a whole edit
    chain) narrow them, and only ever to jobs the user owns."""
    _check_user(user_id)
    problems = [(name, optional_id_problem(value)) for name, value in (("project_id", project_id), ("canvas_id", canvas_id))]
    problems.append(("root_job_id", _optional_uuid_problem(root_job_id)))
    problems = [(name, problem) for name, problem in problems if problem]
    if problems:
        raise InvalidJobRequest(problems)
    where = storage.JobFilter(status, project_id or None, canvas_id or None, uuid.UUID(root_job_id) if root_job_id else None)
    if page_size < 0:
        raise InvalidJobRequest([("page_size", "must not be negative")])
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    scope = _list_scope(where)
    after = _decode_page_token(page_token, user_id, scope)
    async with _connection(deps) as conn:
        rows = await storage.list_jobs(conn, user_id, status, after, size + 1, timeout=deps.settings.step_seconds,
                                       where=where)  # fmt: skip
        images = await storage.delivered_images(conn, [row.job_id for row in rows[:size]],
                                                timeout=deps.settings.step_seconds)  # fmt: skip
    jobs = tuple(Job(row, _images(images.get(row.job_id, ()))) for row in rows[:size])
    token = _encode_page_token(rows[size - 1], user_id, scope) if len(rows) > size else ""
    return JobPage(jobs, token)


def _list_scope(where: storage.JobFilter) -> str:
    """The filters a page token is bound to (just the status when nothing else narrows the
    list, so tokens handed out before the other filters existed still work)."""
    scope = str(where.status or "")
    narrowed = (where.project_id, where.canvas_id, where.root_job_id)
    if any(value is not None for value in narrowed):
        scope += "\x1f" + json.dumps([None if value is None else str(value) for value in narrowed])
    return scope


def _encode_page_token(row: JobRow, user_id: str, scope: str) -> str:
    # Bound to the list it came from: another user's or another filter's is refused.
    return page_tokens.encode({"k": page_tokens.list_key(user_id, scope), "t": row.create_time.isoformat(),
                               "j": str(row.job_id)})  # fmt: skip


def _decode_page_token(token: str, user_id: str, scope: str) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    raw = page_tokens.decode(token)
    try:
        if raw["k"] != page_tokens.list_key(user_id, scope):
            raise ValueError("another list's token")
        return datetime.fromisoformat(raw["t"]), uuid.UUID(raw["j"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidJobRequest([("page_token", "not a page token of this list; send the one the last page gave")]) from None


@dataclass(frozen=True)
class PreviewFrame:
    """A preview for a watcher: a serialized JobPreview (jobs.wire.preview_payload)."""

    payload: bytes


async def watch_job(deps: JobDeps, changes: JobChanges, *, job_id: str, user_id: str) -> AsyncIterator[Job | PreviewFrame]:
    """Yields the job now, then each change, until it is final (or the stream has lasted
    watch_max_seconds: it then ends with the current state, and the client watches again);
    for a job that asked for previews, each preview too as it arrives."""
    job = await get_job(deps, job_id=job_id, user_id=user_id)
    async with contextlib.AsyncExitStack() as stack:
        try:
            subscription = await stack.enter_async_context(changes.watch(str(job.row.job_id)))
        except WatcherLimitReached as error:
            raise TooManyWatchers(error.limit) from None
        previews: asyncio.Queue[bytes] | None = None
        if job.row.partial_images and not job.final and deps.previews is not None:
            previews = await stack.enter_async_context(deps.previews.watch(job.row.job_id))
        # Subscribed before this read, so no change slips between the two.
        job = await subscription.current(lambda: get_job(deps, job_id=job_id, user_id=user_id))
        yield job
        deadline = subscription.now() + deps.settings.watch_max_seconds
        while not job.final:
            left = deadline - subscription.now()
            waiting = asyncio.ensure_future(subscription.wait(min(left, deps.settings.watch_recheck_seconds)))
            try:
                async for preview in _previews_until(waiting, previews):
                    yield PreviewFrame(preview)
                changed = await waiting
            finally:
                waiting.cancel()
            if changed:
                latest = await subscription.current(lambda: get_job(deps, job_id=job_id, user_id=user_id))
            else:
                # Notifications leave after the commit (shared/notices.py): one lost with a
                # dying process costs a watcher at most this recheck, not the whole stream.
                latest = await get_job(deps, job_id=job_id, user_id=user_id)
            if latest.row.update_time != job.row.update_time:
                job = latest
                yield job
            if not changed and (subscription.closing or left <= deps.settings.watch_recheck_seconds):
                return


async def _previews_until(waiting: asyncio.Future[Any], previews: asyncio.Queue[bytes] | None) -> AsyncIterator[bytes]:
    """The previews that arrive before `waiting` is done (none without a queue)."""
    if previews is None:
        return
    while not waiting.done():
        arriving = asyncio.ensure_future(previews.get())
        try:
            await asyncio.wait({waiting, arriving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not arriving.done():
                arriving.cancel()
        if arriving.done() and not arriving.cancelled():
            yield arriving.result()


# ---------------------------------------------------------------- cancel, settle


async def cancel_job(deps: JobDeps, *, job_id: str, user_id: str) -> Job:
    """CANCELLED now; what was not delivered is owed back and refunded at once where credits answers."""
    _check_user(user_id)
    parsed = parse_job_id(job_id)
    async with _connection(deps) as conn:
        outcome = await storage.cancel_job(conn, parsed, user_id, announce=wire.completed_event,
                                           timeout=deps.settings.step_seconds)  # fmt: skip
    if outcome is None:
        raise JobNotFound()
    row, cancelled = outcome
    if not cancelled:
        raise JobAlreadyFinished(row.status)
    deps.on_changed(parsed)
    deps.on_queued()  # whatever the cancel's transaction queued leaves at once
    JOBS_CANCELLED.inc()
    log.info("job.cancelled", extra={"job_id": str(parsed), "user_id": user_id, "credits_refunded": row.credits_refunded})
    try:
        row = await settle_job(deps, row)
    except DependencyUnavailable as error:
        # The job's queue message is still unacknowledged; its worker settles later.
        log.warning("job.settle_deferred", extra={"job_id": str(parsed), "error": str(error)})
    return await _job(deps, row)


async def settle_job(deps: JobDeps, row: JobRow, slots: Sequence[SlotRow] | None = None) -> JobRow:
    """Pays what a final job owes: each refund once, then RecordGeneration once; the job
    row as settled. DependencyUnavailable when credits is away (call again later).
    `slots`: the final job's slots when the caller has just read them (read here if not)."""
    if row.settled:
        return row
    if slots is None:
        slots = await _write(deps, storage.job_slots, row.job_id)
    for slot in slots:
        if slot.status is SlotStatus.FAILED and slot.reserved_bytes is not None:
            await _give_back_storage(deps, row, slot)
    for slot in slots:
        if slot.refund and not slot.refunded:
            await _refund_slot(deps, row, slot)
    delivered = [slot for slot in slots if slot.status in (SlotStatus.DELIVERED, SlotStatus.DELETING, SlotStatus.DELETED)]
    await deps.credits.record_generation(
        user_id=row.user_id, job_id=str(row.job_id), model=row.model, requested=row.num_images,
        delivered=len(delivered), bytes_stored=sum(slot.size_bytes or 0 for slot in delivered),
    )  # fmt: skip
    settled = await _write(deps, storage.mark_settled, row.job_id)
    log.info("job.settled", extra={"job_id": str(row.job_id), "user_id": row.user_id,
                                   "credits_refunded": row.credits_refunded, "images_delivered": len(delivered)})  # fmt: skip
    return settled or row


async def _give_back_storage(deps: JobDeps, row: JobRow, slot: SlotRow) -> None:
    """A slot that failed after its storage reservation was asked for: the reservation is
    replayed (it answers as it did, or reserves now) and released, and the object, if it
    went up, removed. Net: nothing of the slot stays reserved or stored."""
    assert slot.reserved_bytes is not None
    try:
        await deps.credits.reserve_storage(
            user_id=row.user_id, size=slot.reserved_bytes, request_id=f"image:{slot.image_id}:reserve"
        )
    except StorageQuotaExceeded:
        pass  # nothing was reserved
    else:
        await deps.objects.delete(image_key(row.user_id, row.job_id, slot.slot))
        await deps.credits.release_storage(
            user_id=row.user_id, size=slot.reserved_bytes, request_id=f"image:{slot.image_id}:release"
        )
    await _write(deps, storage.forget_reservation, row.job_id, slot.slot)
    log.info("job.storage_released", extra={"job_id": str(row.job_id), "user_id": row.user_id, "slot": slot.slot})


async def _refund_slot(deps: JobDeps, row: JobRow, slot: SlotRow) -> None:
    assert row.charge_id is not None
    try:
        await deps.credits.refund(
            charge_id=row.charge_id, amount=slot.refund, reason=f"job {row.job_id} image {slot.slot} not delivered",
            request_id=f"job:{row.job_id}:refund:{slot.slot}",
        )  # fmt: skip
    except (RefundExceedsCharge, ChargeNotFound) as error:
        # Nothing more can be given back for this charge; an operator should look.
        log.error("job.refund_refused", extra={"job_id": str(row.job_id), "slot": slot.slot, "error": str(error)})
    await _write(deps, storage.mark_refunded, row.job_id, slot.slot)
    count_refund("image", slot.refund)
    log.info("job.image_refunded", extra={"job_id": str(row.job_id), "slot": slot.slot, "amount": slot.refund})


# ---------------------------------------------------------------- images


async def delete_image(deps: JobDeps, *, image_id: str, user_id: str) -> None:
    """Removes the object and releases its storage, once. A second call is NOT_FOUND: the
    image is gone, and NOT_FOUND is what any image that is not there answers."""
    _check_user(user_id)
    parsed = parse_job_id(image_id, "image_id")
    async with _connection(deps) as conn:
        slot = await storage.start_image_deletion(conn, parsed, user_id, timeout=deps.settings.step_seconds)
    if slot is None:
        raise ImageNotFound()
    # DELETING is committed first, so a failure below leaves the image hidden and a
    # repeat of the call finishes the job (each step is idempotent).
    assert slot.storage_id is not None and slot.size_bytes is not None
    await deps.objects.delete(slot.storage_id)
    await deps.credits.release_storage(user_id=user_id, size=slot.size_bytes, request_id=f"image:{parsed}:release")
    await _write(deps, storage.finish_image_deletion, parsed)
    deps.on_changed(slot.job_id)
    log.info("job.image_deleted", extra={"image_id": str(parsed), "user_id": user_id, "storage_id": slot.storage_id})


async def user_owns_image(deps: JobDeps, *, user_id: str, storage_id: str) -> bool:
    """Whether `storage_id` is a delivered image of one of the user's jobs (GetImageUrl)."""
    async with _connection(deps) as conn:
        return await storage.user_has_image(conn, user_id, storage_id, timeout=deps.settings.step_seconds)


async def job_stats(deps: JobDeps, *, user_id: str, project_id: str, every_owner: bool = False) -> JobStats:
    """Per user, per project (the user's jobs in it), or with `every_owner` (operators only)
    a whole project across its users."""
    problems = [("user_id", optional_id_problem(user_id)), ("project_id", optional_id_problem(project_id))]
    problems = [(name, problem) for name, problem in problems if problem]
    if not user_id and not project_id:
        problems.append(("user_id", "give a user_id, a project_id, or both"))
    elif not user_id and not every_owner:
        problems.append(("user_id", "required: a project's statistics show only the user's own jobs in it"))
    if problems:
        raise InvalidJobRequest(problems)
    async with _connection(deps) as conn:
        totals = await storage.job_stats(conn, user_id or None, project_id or None, timeout=deps.settings.step_seconds)
    counts = {status: totals.counts.get(status, 0) for status in storage.VISIBLE_STATUSES_ORDERED}
    finished = counts[JobStatus.COMPLETED] + counts[JobStatus.FAILED]
    return JobStats(
        counts=counts,
        total=sum(counts.values()),
        success_rate=counts[JobStatus.COMPLETED] / finished if finished else 0.0,
        credits_charged=totals.credits_charged,
        credits_refunded=totals.credits_refunded,
        average_processing_time_ms=totals.average_processing_time_ms,
        provider_cost_microdollars=totals.provider_cost_microdollars,
    )


# ---------------------------------------------------------------- plumbing


async def _gather(first: Any, second: Any) -> tuple[Any, Any]:
    """Both results; if either fails, the other is cancelled and the first failure raised."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        one, two = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return one, two


@contextlib.asynccontextmanager
async def _connection(deps: JobDeps) -> AsyncIterator[Any]:
    try:
        async with deps.pool.acquire(timeout=deps.settings.step_seconds) as conn:
            yield conn
    except (OSError, TimeoutError) as error:
        raise DependencyUnavailable(f"database: {type(error).__name__}: {error}") from error
    except Exception as error:
        if storage.is_unavailable(error):
            raise DependencyUnavailable(f"database: {type(error).__name__}: {error}") from error
        raise


async def _read_row(deps: JobDeps, job_id: uuid.UUID) -> JobRow | None:
    async with _connection(deps) as conn:
        return await storage.get_job(conn, job_id, timeout=deps.settings.step_seconds)


async def _write(deps: JobDeps, write: Any, *args: Any) -> Any:
    async with _connection(deps) as conn:
        return await write(conn, *args, timeout=deps.settings.step_seconds)


async def _change(deps: JobDeps, write: Any, job_id: uuid.UUID, *args: Any) -> Any:
    """A write that may change the job `job_id`; its watchers are told once it is committed."""
    result = await _write(deps, write, job_id, *args)
    deps.on_changed(job_id)
    return result


async def _job(deps: JobDeps, row: JobRow) -> Job:
    async with _connection(deps) as conn:
        images = await storage.delivered_images(conn, [row.job_id], timeout=deps.settings.step_seconds)
    return Job(row, _images(images.get(row.job_id, ())))


def _images(slots: Sequence[SlotRow]) -> tuple[JobImage, ...]:
    return tuple(
        JobImage(str(slot.image_id), slot.storage_id or "", slot.content_type or "image/png", slot.size_bytes or 0,
                 slot.width or 0, slot.height or 0)  # fmt: skip
        for slot in slots
    )


def _ids(checked: CheckedRequest, **fields: Any) -> dict[str, Any]:
    request = checked.request
    return {"job_id": str(checked.job_id), "user_id": request.user_id, "request_id": request.request_id, **fields}


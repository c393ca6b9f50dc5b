"""Credits: accounts, plans, the ledger's rules and the use cases; no gRPC and no SQL text.

Amounts are integers in hundredths of a credit (1 credit = 100), never floats.

Every method that moves something is keyed by a request_id, as Stripe keys requests and
TigerBeetle keys transfers: the first request with a key does the work and records its
answer in the same transaction; a replay with the same parameters gets that answer again
and moves nothing; the key with other parameters is refused and nothing is written. A
refusal that *is* the answer (balance short, quota full, refund beyond the charge) is
recorded like a success, so a caller who acted on it never sees the same request succeed
later. Faults (database down, a rate limit) are not answers: they are never recorded and a
retry with the same key runs the request afresh.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import itertools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import asyncpg

from services.credits import storage
from shared import page_tokens
from shared.coalescing import Coalescer
from shared.db import pooled_connection
from shared.validation import id_problem, optional_id_problem, text_problem

log = logging.getLogger(__name__)

T = TypeVar("T")

# 10 credits, as the proto promises every new account.
WELCOME_GRANT = 1000
WELCOME_REFERENCE = "welcome grant"
# Bounds that keep every sum far from int64 (9.2 * 10^18): a movement is at most 10^12
# (10 billion credits), a balance at most 10^15, so every running sum of a ledger (each is
# some entry's balance_after) is at most 10^15. The migration enforces the same numbers.
MAX_AMOUNT = 10**12
MAX_BALANCE = 10**15
# 1 PiB: beyond any plan's quota, small enough that used + requested cannot overflow.
MAX_STORAGE_BYTES = 2**50
MAX_IMAGES_PER_JOB = 100
MAX_REASON_CHARS = 500
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
_INT64_MAX = 2**63 - 1
# A request that keeps losing races to twins (or deadlocks) this often is answered ABORTED.
_RACE_ATTEMPTS = 8
# Waiting for a pooled connection longer than this means the database is not keeping up.
_ACQUIRE_TIMEOUT_SECONDS = 10.0

_GIB = 1024**3
_DONE = "DONE"


class Plan(enum.StrEnum):
    FREE = "FREE"
    PRO = "PRO"
    ENTERPRISE = "ENTERPRISE"

    @property
    def storage_quota_bytes(self) -> int:
        return _STORAGE_QUOTA_BYTES[self]


# The contract says "1 GB / 100 GB / 500 GB"; we read GB as binary GiB (1 GiB = 1073741824
# bytes) so that quotas match what storage tools and S3 consoles report.
_STORAGE_QUOTA_BYTES = {Plan.FREE: 1 * _GIB, Plan.PRO: 100 * _GIB, Plan.ENTERPRISE: 500 * _GIB}


class LedgerEntryKind(enum.StrEnum):
    GRANT = "GRANT"
    CHARGE = "CHARGE"
    REFUND = "REFUND"
    ADJUSTMENT = "ADJUSTMENT"


class Operation(enum.StrEnum):
    """What a request_id was first used for; a key is never reused for another operation."""

    WELCOME_GRANT = "WELCOME_GRANT"
    GRANT = "GRANT"
    CHARGE = "CHARGE"
    REFUND = "REFUND"
    RESERVE_STORAGE = "RESERVE_STORAGE"
    RELEASE_STORAGE = "RELEASE_STORAGE"


class StorageEntryKind(enum.StrEnum):
    RESERVE = "RESERVE"
    RELEASE = "RELEASE"


# ---------------------------------------------------------------------------- errors


class CreditsError(Exception):
    """A request the credits rules refuse; the handlers' table maps each class to a status."""


class InvalidRequest(CreditsError):
    """One or more fields are unusable; nothing was read or written."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{name}: {problem}" for name, problem in violations))
        self.violations = violations


class RequestIdReused(InvalidRequest):
    def __init__(self, request_id: str, first_operation: str, *, by_another_user: bool = False) -> None:
        first_use = f"a {first_operation} of another user" if by_another_user else f"a {first_operation} with other arguments"
        super().__init__(
            [("request_id", f"{request_id!r} was already used for {first_use}; use a new request_id for a new request")]
        )
        self.metadata = {"request_id": request_id, "first_operation": first_operation}


class JobRecordedWithOtherArguments(InvalidRequest):
    def __init__(self, job_id: str) -> None:
        super().__init__([("job_id", f"{job_id!r} was already recorded with other arguments")])
        self.metadata = {"job_id": job_id}


class RememberedRefusal(CreditsError):
    """A refusal that is the request's answer: recorded under its request_id and replayed."""

    outcome: str  # the stable name stored with the request (and its ErrorInfo reason)

    def __init__(self, message: str, answer: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.answer = dict(answer)
        self.metadata = {key: str(value) for key, value in self.answer.items()}

    def as_replay(self) -> RememberedRefusal:
        self.metadata["replayed"] = "true"
        return self


class InsufficientCredits(RememberedRefusal):
    outcome = "INSUFFICIENT_CREDITS"

    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(f"the balance {balance} is short of the cost {cost}; nothing was charged",
                         {"balance": balance, "cost": cost})


class RefundExceedsCharge(RememberedRefusal):
    outcome = "REFUND_EXCEEDS_CHARGE"

    def __init__(self, charge_id: str, charged: int, refunded: int, requested: int) -> None:
        super().__init__(
            f"charge {charge_id} took {charged} and {refunded} of it is refunded already, "
            f"so at most {charged - refunded} can be refunded, not {requested}",
            {"charge_id": charge_id, "charged": charged, "refunded": refunded, "requested": requested},
        )


class QuotaExceeded(RememberedRefusal):
    outcome = "QUOTA_EXCEEDED"

    def __init__(self, used: int, requested: int, quota: int) -> None:
        super().__init__(
            f"reserving {requested} bytes with {used} in use would pass the plan's quota of {quota} bytes",
            {"used": used, "requested": requested, "quota": quota},
        )


class BalanceLimitExceeded(RememberedRefusal):
    outcome = "BALANCE_LIMIT_EXCEEDED"

    def __init__(self, balance: int, amount: int) -> None:
        super().__init__(f"adding {amount} to the balance {balance} would pass the limit {MAX_BALANCE}",
                         {"balance": balance, "amount": amount, "limit": MAX_BALANCE})


_REMEMBERED_REFUSALS: dict[str, Callable[..., RememberedRefusal]] = {
    InsufficientCredits.outcome: lambda answer: InsufficientCredits(answer["balance"], answer["cost"]),
    RefundExceedsCharge.outcome: lambda answer: RefundExceedsCharge(
        answer["charge_id"], answer["charged"], answer["refunded"], answer["requested"]
    ),
    QuotaExceeded.outcome: lambda answer: QuotaExceeded(answer["used"], answer["requested"], answer["quota"]),
    BalanceLimitExceeded.outcome: lambda answer: BalanceLimitExceeded(answer["balance"], answer["amount"]),
}
REMEMBERED_OUTCOMES = frozenset(_REMEMBERED_REFUSALS)


class ChargeNotFound(CreditsError):
    def __init__(self, charge_id: str) -> None:
        super().__init__(f"charge_id: no charge {charge_id!r}")
        self.field = "charge_id"
        self.metadata = {"charge_id": charge_id}


class RateLimited(CreditsError):
    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(f"too many charges for this user; try again in {retry_after_seconds:.3f} s; nothing was charged")
        self.retry_after_seconds = retry_after_seconds


class RequestContended(CreditsError):
    def __init__(self) -> None:
        super().__init__("the request kept racing concurrent requests for the same account; try again")


class CreditsUnavailable(CreditsError):
    def __init__(self) -> None:
        super().__init__("the credits database is unavailable; try again (with the same request_id)")


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Account:
    user_id: str
    plan: Plan
    balance: int
    storage_used_bytes: int
    created_at: datetime
    updated_at: datetime

    @property
    def storage_quota_bytes(self) -> int:
        return self.plan.storage_quota_bytes


@dataclass(frozen=True)
class Answered(Generic[T]):
    """A use case's answer, and whether it is the recorded first answer of a replayed key."""

    value: T
    replayed: bool = False


@dataclass(frozen=True)
class Charged:
    charge_id: str
    balance: int


@dataclass(frozen=True)
class Refunded:
    refund_id: str
    balance: int


@dataclass(frozen=True)
class Usage:
    user_id: str
    generations_count: int
    generations_success: int
    generations_failed: int
    credits_used: int
    model_usage: dict[str, int] = field(default_factory=dict)
    storage_used_bytes: int = 0
    bytes_generated: int = 0


@dataclass(frozen=True)
class LedgerEntry:
    entry_id: str
    user_id: str
    kind: LedgerEntryKind
    amount: int
    balance_after: int
    reference: str
    request_id: str
    refunded_charge_id: str
    created_at: datetime


@dataclass(frozen=True)
class LedgerPage:
    entries: list[LedgerEntry]
    next_page_token: str


@dataclass(frozen=True)
class ChargeRateLimit:
    """The per-user token bucket on Charge: `burst` tokens, refilled at `per_second`."""

    per_second: Decimal
    burst: int


# ---------------------------------------------------------------------------- validation


def _refuse_invalid(*checks: tuple[str, str | None]) -> None:
    """Raises InvalidRequest naming every field whose problem is not None."""
    violations = [(name, problem) for name, problem in checks if problem is not None]
    if violations:
        raise InvalidRequest(violations)


def _count_problem(value: int, *, minimum: int, maximum: int) -> str | None:
    if value < minimum:
        return {0: "must not be negative", 1: "must be positive"}.get(minimum, f"must be at least {minimum}")
    if value > maximum:
        return f"must be at most {maximum}"
    return None


def _delivered_problem(delivered: int, requested: int) -> str | None:
    if delivered < 0:
        return "must not be negative"
    if delivered > requested:
        return "must not be more than images_requested"
    return None


def _amount_problem(amount: int) -> str | None:
    return _count_problem(amount, minimum=1, maximum=MAX_AMOUNT)


def _reason_problem(reason: str) -> str | None:
    return text_problem(reason, max_chars=MAX_REASON_CHARS)


def _canonical_charge_id(charge_id: str) -> str | None:
    """The charge id as the ledger spells it (a UUID), or None when it can name no charge."""
    try:
        return str(uuid.UUID(charge_id))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- plumbing


@contextlib.asynccontextmanager
async def _connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection; a lost or refused database becomes CreditsUnavailable."""
    try:
        async with pooled_connection(pool, _ACQUIRE_TIMEOUT_SECONDS) as conn:
            yield conn
    except Exception as error:
        if not storage.is_unavailable(error):
            raise
        log.warning("credits.database_unreached", extra={"error": repr(error)})
        raise CreditsUnavailable() from error


async def _retrying(attempt: Callable[[], Awaitable[T]]) -> T:
    """Runs `attempt` again when it lost a race to a twin request (or a deadlock)."""
    for _ in range(_RACE_ATTEMPTS):
        try:
            return await attempt()
        except storage.RACE_ERRORS as error:
            log.info("credits.request_race_lost", extra={"error": repr(error)})
    raise RequestContended()


async def _open_account(conn: asyncpg.Connection, user_id: str) -> Any:
    """Opens the account on FREE with its welcome grant unless it exists; its row."""
    # The account, its first ledger entry and the grant's request record commit together,
    # so the balance equals the ledger's sum from the very first moment. Concurrent first
    # calls race on the primary key: one insert wins, the others wait for it, then see it.
    async with conn.transaction():
        opened = await storage.insert_account_if_missing(conn, user_id, plan=Plan.FREE, balance=WELCOME_GRANT)
        if opened:
            entry = await storage.insert_ledger_entry(
                conn,
                user_id=user_id,
                kind=LedgerEntryKind.GRANT,
                amount=WELCOME_GRANT,
                balance_after=WELCOME_GRANT,
                reference=WELCOME_REFERENCE,
                request_id=welcome_request_id(user_id),
            )
            await storage.insert_request(
                conn,
                user_id=user_id,
                request_id=welcome_request_id(user_id),
                operation=Operation.WELCOME_GRANT,
                parameters={"amount": WELCOME_GRANT},
                outcome=_DONE,
                answer={"entry_id": entry["entry_id"], "balance": WELCOME_GRANT},
            )
    row = await storage.fetch_account(conn, user_id)
    if opened:
        log.info("account.opened", extra={"user_id": user_id, "balance": WELCOME_GRANT})
    return row


async def _locked_account(conn: asyncpg.Connection, user_id: str) -> Account:
    """The account with its row locked for this transaction, opened first if need be."""
    row = await storage.lock_account(conn, user_id)
    if row is None:
        await _open_account(conn, user_id)
        row = await storage.lock_account(conn, user_id)
    return _account_from_row(row)


def welcome_request_id(user_id: str) -> str:
    return f"welcome:{user_id}"


def _replayed_answer(
    prior: storage.RecordedRequest,
    *,
    user_id: str,
    request_id: str,
    operation: Operation,
    parameters: Mapping[str, Any],
) -> dict[str, Any]:
    """The recorded answer of a replayed key; raises when the key was used otherwise."""
    if prior.user_id != user_id or prior.operation != operation or prior.parameters != dict(parameters):
        log.warning(
            "credits.request_id_reused",
            extra={"user_id": user_id, "request_id": request_id, "operation": operation,
                   "first_operation": prior.operation},
        )
        raise RequestIdReused(request_id, prior.operation, by_another_user=prior.user_id != user_id)
    if prior.outcome != _DONE:
        raise _REMEMBERED_REFUSALS[prior.outcome](prior.answer).as_replay()
    return prior.answer


# What a keyed action returns: its answer, or the refusal that is its answer.
_Act = Callable[[asyncpg.Connection, Account], Awaitable["dict[str, Any] | RememberedRefusal"]]


async def _run_keyed(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    request_id: str,
    operation: Operation,
    parameters: Mapping[str, Any],
    act: _Act,
) -> Answered[dict[str, Any]]:
    """Runs `act` once per (user_id, request_id), under the account's row lock, and records
    its answer in the same transaction; a replay gets the recorded answer."""

    async def attempt() -> Answered[dict[str, Any]]:
        async with _connection(pool) as conn, conn.transaction():
            account = await _locked_account(conn, user_id)
            # Read after the lock: a twin that committed while we waited is visible now.
            prior = await storage.fetch_request(conn, user_id, request_id)
            if prior is not None:
                answer = _replayed_answer(
                    prior, user_id=user_id, request_id=request_id, operation=operation, parameters=parameters
                )
                return Answered(answer, replayed=True)
            result = await act(conn, account)
            refused = isinstance(result, RememberedRefusal)
            await storage.insert_request(
                conn,
                user_id=user_id,
                request_id=request_id,
                operation=operation,
                parameters=dict(parameters),
                outcome=result.outcome if refused else _DONE,
                answer=result.answer if refused else result,
            )
        if refused:
            log.info(f"credits.{operation.lower()}_refused",
                     extra={"user_id": user_id, "request_id": request_id, "reason": result.outcome, **result.answer})
            raise result
        return Answered(result)

    return await _retrying(attempt)


# ---------------------------------------------------------------------------- accounts


class Accounts:
    """GetAccount's reads. Calls that come while a read is on its way share the next
    SELECT (shared/coalescing.py), as GetStory's do: the balance is the most read figure
    of the service, by the gateway for every player and by every CreateGenerationJob."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._reads: Coalescer[str, Any] = Coalescer(self._fetch_many)

    async def _fetch_many(self, user_ids: list[str]) -> dict[str, Any]:
        async with _connection(self._pool) as conn:
            return await storage.fetch_accounts(conn, user_ids)

    async def get(self, user_id: str) -> Account:
        """The user's account, opened on first sight on FREE with the welcome grant."""
        _refuse_invalid(("user_id", id_problem(user_id)))
        row = await self._reads.ask(user_id)
        if row is None:
            async with _connection(self._pool) as conn:
                row = await _open_account(conn, user_id)
        return _account_from_row(row)


async def grant(pool: asyncpg.Pool, *, user_id: str, amount: int, reason: str, request_id: str) -> Answered[Account]:
    _refuse_invalid(
        ("user_id", id_problem(user_id)),
        ("amount", _amount_problem(amount)),
        ("reason", _reason_problem(reason)),
        ("request_id", id_problem(request_id)),
    )

    async def add_credits(conn: asyncpg.Connection, account: Account) -> dict[str, Any] | RememberedRefusal:
        if account.balance + amount > MAX_BALANCE:
            return BalanceLimitExceeded(account.balance, amount)
        row = await storage.add_to_balance(conn, user_id, amount)
        await storage.insert_ledger_entry(
            conn, user_id=user_id, kind=LedgerEntryKind.GRANT, amount=amount, balance_after=row["balance"],
            reference=reason, request_id=request_id,
        )
        log.info("credits.granted", extra={"user_id": user_id, "request_id": request_id, "amount": amount,
                                           "balance": row["balance"]})
        return _account_answer(row)

    answered = await _run_keyed(
        pool, user_id=user_id, request_id=request_id, operation=Operation.GRANT,
        parameters={"amount": amount, "reason": reason}, act=add_credits,
    )
    return Answered(_account_from_answer(answered.value), answered.replayed)


async def set_plan(pool: asyncpg.Pool, *, user_id: str, plan: Plan | None) -> Account:
    """Changes the plan. A smaller plan is allowed with more storage in use than its quota;
    reservations are then refused until releases bring usage under it."""
    _refuse_invalid(
        ("user_id", id_problem(user_id)),
        ("plan", None if plan is not None else "must be PLAN_FREE, PLAN_PRO or PLAN_ENTERPRISE"),
    )
    assert plan is not None
    async with _connection(pool) as conn, conn.transaction():
        before = await _locked_account(conn, user_id)
        row = await storage.set_plan(conn, user_id, plan)
    if before.plan != plan:
        log.info("credits.plan_changed", extra={"user_id": user_id, "from_plan": before.plan, "to_plan": plan})
    return _account_from_row(row)


# ---------------------------------------------------------------------------- Charge


BATCHES_IN_FLIGHT = 2
# A charge in a batch: a number of its own, so that twin calls (same user, same request_id)
# are two keys of the batch and the second is answered as the replay it is.
_BatchedCharge = tuple[int, storage.AskedCharge]


class Charges:
    """Charge's dependencies: the pool, the rate limit, and the batches concurrent charges
    share (shared/coalescing.py): the calls that arrive while one batch's statement is on
    its way are debited by the next one, a single statement for all of them."""

    def __init__(self, pool: asyncpg.Pool, limit: ChargeRateLimit) -> None:
        self.pool = pool
        self.limit = limit
        # Two batches at a time: one waiting on a row lock (an account busy with a grant or
        # a refund) does not hold up the next. No account is ever in two batches (see
        # `charge`), so two batches never wait on each other's locks.
        self.batches: Coalescer[_BatchedCharge, storage.ChargeAttempt] = Coalescer(
            self._charge_batch, max_in_flight=BATCHES_IN_FLIGHT
        )
        self.call_numbers = itertools.count()
        # How many Charge calls of each user are in flight, batched or alone.
        self.in_flight: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def call_of(self, user_id: str) -> Iterator[bool]:
        """Counts a Charge call of `user_id` while it runs; yields whether it joins a batch.

        Only a user with no other charge in flight does; the others charge alone at once.
        A batch takes one charge per account, and one whose account is busy would wait on
        its row lock, and the whole batch with it: a hot account's charges queue on its lock
        by themselves, as they would without batches, and never hold up other users'.
        """
        batched = self.in_flight[user_id] == 0
        self.in_flight[user_id] += 1
        try:
            yield batched
        finally:
            self.in_flight[user_id] -= 1
            if not self.in_flight[user_id]:
                del self.in_flight[user_id]

    async def _charge_batch(self, calls: list[_BatchedCharge]) -> dict[_BatchedCharge, storage.ChargeAttempt]:
        """The batch's first charge of each request_id (and of each user, which `call_of`
        already sees to); the others are left out, so their callers charge alone: a
        repeated request_id would fail the whole statement on its unique key, and one
        UPDATE cannot move an account twice."""
        users: set[str] = set()
        request_ids: set[str] = set()
        batch: dict[storage.AskedCharge, _BatchedCharge] = {}
        for call in calls:
            asked = call[1]
            if asked.user_id not in users and asked.request_id not in request_ids:
                users.add(asked.user_id)
                request_ids.add(asked.request_id)
                batch[asked] = call
        async with _connection(self.pool) as conn:
            attempts = await storage.charge_many(
                conn, list(batch), parameters=[_charge_parameters(asked) for asked in batch],
                burst=self.limit.burst, rate_per_second=self.limit.per_second,
            )
        return {batch[asked]: attempt for asked, attempt in attempts.items()}


def _charge_parameters(charge: storage.AskedCharge) -> dict[str, Any]:
    return {"amount": charge.amount, "reference": charge.reference}


async def charge(charges: Charges, *, user_id: str, amount: int, reference: str, request_id: str) -> Answered[Charged]:
    """Takes `amount` if the balance holds it; never below zero, however many run at once."""
    _refuse_invalid(
        ("user_id", id_problem(user_id)),
        ("amount", _amount_problem(amount)),
        ("reference", id_problem(reference)),
        ("request_id", id_problem(request_id)),
    )
    asked = storage.AskedCharge(user_id=user_id, request_id=request_id, amount=amount, reference=reference)

    async def attempt(batched: bool) -> Answered[Charged]:
        tried = await _charge_in_a_batch(charges, asked) if batched else None
        if tried is not None and (answered := _charge_answer(asked, tried)) is not None:
            return answered
        async with _connection(charges.pool) as conn:
            # Each pass either answers or changes what the next one sees (an account
            # opened, a twin's record), so a few passes always suffice.
            for _ in range(_RACE_ATTEMPTS):
                if tried is not None:
                    # The last try moved nothing: refuse, or learn what changed and try again.
                    refusal = await _charge_refusal(conn, charges.limit, asked)
                    if refusal is not None:
                        raise refusal
                tried = await storage.charge(
                    conn, user_id=user_id, request_id=request_id, amount=amount, reference=reference,
                    parameters=_charge_parameters(asked), burst=charges.limit.burst,
                    rate_per_second=charges.limit.per_second,
                )
                if (answered := _charge_answer(asked, tried)) is not None:
                    return answered
        raise RequestContended()

    with charges.call_of(user_id) as batched:
        return await _retrying(functools.partial(attempt, batched))


async def _charge_in_a_batch(charges: Charges, asked: storage.AskedCharge) -> storage.ChargeAttempt | None:
    """The batch's attempt at this charge; None when it was left out of the batch or the
    batch's statement failed (a twin of another call raced it, the database is away): the
    charge then runs alone, where any such failure is this call's own."""
    try:
        return await charges.batches.ask((next(charges.call_numbers), asked))
    except Exception as error:  # noqa: BLE001 - the lone attempt meets it again if it is ours
        log.info("credits.charge_batch_failed", extra={"user_id": asked.user_id, "request_id": asked.request_id,
                                                       "error": repr(error)})
        return None


def _charge_answer(asked: storage.AskedCharge, tried: storage.ChargeAttempt) -> Answered[Charged] | None:
    """The call's answer from an attempt that replayed or charged; None when it did neither."""
    if tried.prior is not None:
        answer = _replayed_answer(tried.prior, user_id=asked.user_id, request_id=asked.request_id,
                                  operation=Operation.CHARGE, parameters=_charge_parameters(asked))
        return Answered(Charged(answer["charge_id"], answer["balance"]), replayed=True)
    if tried.charge_id is None:
        return None
    log.info("credits.charged", extra={"user_id": asked.user_id, "request_id": asked.request_id,
                                       "charge_id": tried.charge_id, "amount": asked.amount,
                                       "balance": tried.balance})
    return Answered(Charged(tried.charge_id, tried.balance))


async def _charge_refusal(
    conn: asyncpg.Connection, limit: ChargeRateLimit, asked: storage.AskedCharge
) -> CreditsError | None:
    """Why a charge moved nothing, decided under the account's row lock; None when the
    charge should simply run again (the account was missing, or things changed)."""
    user_id, request_id, amount = asked.user_id, asked.request_id, asked.amount
    async with conn.transaction():
        state = await storage.lock_for_refusal(conn, user_id, burst=limit.burst, rate_per_second=limit.per_second)
        if state is None:
            await _open_account(conn, user_id)
            return None
        if not state.has_token:
            log.info("credits.charge_rate_limited", extra={"user_id": user_id, "request_id": request_id,
                                                           "retry_after_seconds": state.seconds_until_token})
            return RateLimited(state.seconds_until_token)
        if state.balance >= amount:
            return None
        answer = await storage.remember_insufficient_credits(
            conn, user_id=user_id, request_id=request_id, balance=state.balance, amount=amount,
            parameters=_charge_parameters(asked),
        )
        if answer is None:
            return None
        await storage.take_charge_token(conn, user_id, burst=limit.burst, rate_per_second=limit.per_second)
    log.info("credits.charge_refused", extra={"user_id": user_id, "request_id": request_id,
                                              "reason": InsufficientCredits.outcome, **answer})
    return InsufficientCredits(answer["balance"], answer["cost"])


# ---------------------------------------------------------------------------- Refund


async def refund(
    pool: asyncpg.Pool, *, charge_id: str, amount: int, reason: str, request_id: str
) -> Answered[Refunded]:
    """Gives back part or all of a charge: in all at most what it took, once per request_id.

    The request is keyed on the charge's user (RefundRequest names no user), so two users'
    refunds with the same request_id never meet.
    """
    _refuse_invalid(
        ("charge_id", id_problem(charge_id)),
        ("amount", _amount_problem(amount)),
        ("reason", _reason_problem(reason)),
        ("request_id", id_problem(request_id)),
    )
    canonical_id = _canonical_charge_id(charge_id)
    if canonical_id is None:
        raise ChargeNotFound(charge_id)
    async with _connection(pool) as conn:
        charge_row = await storage.fetch_charge(conn, canonical_id)
    if charge_row is None:
        raise ChargeNotFound(charge_id)
    user_id, charged = charge_row["user_id"], charge_row["amount"]

    async def give_back(conn: asyncpg.Connection, account: Account) -> dict[str, Any] | RememberedRefusal:
        # Every refund of this charge locks this same account first, so this sum is exact.
        refunded = await storage.refunded_so_far(conn, canonical_id)
        if amount > charged - refunded:
            return RefundExceedsCharge(canonical_id, charged, refunded, amount)
        if account.balance + amount > MAX_BALANCE:
            return BalanceLimitExceeded(account.balance, amount)
        row = await storage.add_to_balance(conn, user_id, amount)
        entry = await storage.insert_ledger_entry(
            conn, user_id=user_id, kind=LedgerEntryKind.REFUND, amount=amount, balance_after=row["balance"],
            reference=reason, request_id=request_id, refund_of=canonical_id,
        )
        log.info("credits.refunded", extra={"user_id": user_id, "request_id": request_id, "charge_id": canonical_id,
                                            "refund_id": entry["entry_id"], "amount": amount,
                                            "balance": row["balance"]})
        return {"refund_id": entry["entry_id"], "balance": row["balance"]}

    answered = await _run_keyed(
        pool, user_id=user_id, request_id=request_id, operation=Operation.REFUND,
        parameters={"charge_id": canonical_id, "amount": amount, "reason": reason}, act=give_back,
    )
    return Answered(Refunded(answered.value["refund_id"], answered.value["balance"]), answered.replayed)


# ---------------------------------------------------------------------------- storage


def _storage_problems(user_id: str, size: int, request_id: str) -> None:
    _refuse_invalid(
        ("user_id", id_problem(user_id)),
        ("bytes", _count_problem(size, minimum=1, maximum=MAX_STORAGE_BYTES)),
        ("request_id", id_problem(request_id)),
    )


async def reserve_storage(pool: asyncpg.Pool, *, user_id: str, size: int, request_id: str) -> Answered[Account]:
    """Adds `size` bytes to the storage in use, never past the plan's quota."""
    _storage_problems(user_id, size, request_id)

    async def reserve(conn: asyncpg.Connection, account: Account) -> dict[str, Any] | RememberedRefusal:
        quota = account.storage_quota_bytes
        if account.storage_used_bytes + size > quota:
            return QuotaExceeded(account.storage_used_bytes, size, quota)
        row = await storage.add_to_storage_used(conn, user_id, size)
        await storage.insert_storage_entry(
            conn, user_id=user_id, kind=StorageEntryKind.RESERVE, bytes_delta=size,
            used_after=row["storage_used_bytes"], quota_bytes=quota, request_id=request_id,
        )
        log.info("credits.storage_reserved", extra={"user_id": user_id, "request_id": request_id, "bytes": size,
                                                    "storage_used_bytes": row["storage_used_bytes"]})
        return _account_answer(row)

    answered = await _run_keyed(
        pool, user_id=user_id, request_id=request_id, operation=Operation.RESERVE_STORAGE,
        parameters={"bytes": size}, act=reserve,
    )
    return Answered(_account_from_answer(answered.value), answered.replayed)


async def release_storage(pool: asyncpg.Pool, *, user_id: str, size: int, request_id: str) -> Answered[Account]:
    """Takes `size` bytes off the storage in use, or whatever is left of it: never below zero."""
    _storage_problems(user_id, size, request_id)

    async def release(conn: asyncpg.Connection, account: Account) -> dict[str, Any]:
        released = min(size, account.storage_used_bytes)
        row = await storage.add_to_storage_used(conn, user_id, -released)
        await storage.insert_storage_entry(
            conn, user_id=user_id, kind=StorageEntryKind.RELEASE, bytes_delta=-released,
            used_after=row["storage_used_bytes"], quota_bytes=account.storage_quota_bytes, request_id=request_id,
        )
        log.info("credits.storage_released", extra={"user_id": user_id, "request_id": request_id, "bytes": size,
                                                    "released_bytes": released,
                                                    "storage_used_bytes": row["storage_used_bytes"]})
        return _account_answer(row)

    answered = await _run_keyed(
        pool, user_id=user_id, request_id=request_id, operation=Operation.RELEASE_STORAGE,
        parameters={"bytes": size}, act=release,
    )
    return Answered(_account_from_answer(answered.value), answered.replayed)


# ---------------------------------------------------------------------------- usage


async def record_generation(
    pool: asyncpg.Pool,
    *,
    user_id: str,
    job_id: str,
    model: str,
    images_requested: int,
    images_delivered: int,
    bytes_stored: int,
    request_id: str,
) -> Answered[Usage]:
    """Adds a finished job to the usage statistics, once per job_id (the job is the key)."""
    _refuse_invalid(
        ("user_id", id_problem(user_id)),
        ("job_id", id_problem(job_id)),
        ("model", id_problem(model)),
        ("images_requested", _count_problem(images_requested, minimum=1, maximum=MAX_IMAGES_PER_JOB)),
        ("images_delivered", _delivered_problem(images_delivered, images_requested)),
        ("bytes_stored", _count_problem(bytes_stored, minimum=0, maximum=MAX_STORAGE_BYTES)),
        ("request_id", optional_id_problem(request_id)),
    )
    recorded = {"model": model, "images_requested": images_requested, "images_delivered": images_delivered,
                "bytes_stored": bytes_stored}

    async def attempt() -> Answered[Usage]:
        async with _connection(pool) as conn, conn.transaction():
            # The account lock orders this job against every other change of the user's
            # figures, so the usage recorded as the answer is one consistent moment.
            await _locked_account(conn, user_id)
            prior = await storage.fetch_generation(conn, user_id, job_id)
            if prior is not None:
                if {key: prior[key] for key in recorded} != recorded:
                    raise JobRecordedWithOtherArguments(job_id)
                return Answered(_usage_from_answer(user_id, json.loads(prior["answer"])), replayed=True)
            await storage.insert_generation(conn, user_id=user_id, job_id=job_id, request_id=request_id,
                                            answer={}, **recorded)
            usage = _usage_from_row(user_id, await storage.usage_totals(conn, user_id))
            await storage.set_generation_answer(conn, user_id, job_id, _usage_answer(usage))
        log.info("credits.generation_recorded", extra={"user_id": user_id, "job_id": job_id, **recorded})
        return Answered(usage)

    return await _retrying(attempt)


async def get_usage(pool: asyncpg.Pool, user_id: str) -> Usage:
    _refuse_invalid(("user_id", id_problem(user_id)))
    async with _connection(pool) as conn:
        row = await storage.usage_totals(conn, user_id)
        if row is None:
            await _open_account(conn, user_id)
            row = await storage.usage_totals(conn, user_id)
    return _usage_from_row(user_id, row)


# ---------------------------------------------------------------------------- ledger


async def list_ledger_entries(pool: asyncpg.Pool, *, user_id: str, page_size: int, page_token: str) -> LedgerPage:
    """The user's ledger newest first; a page token only continues the list it came from."""
    _refuse_invalid(
        ("user_id", id_problem(user_id)),
        ("page_size", "must not be negative" if page_size < 0 else None),
    )
    before_seq = _page_token_seq(user_id, page_token) if page_token else None
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    async with _connection(pool) as conn:
        if before_seq is None and await storage.fetch_account(conn, user_id) is None:
            await _open_account(conn, user_id)
        rows = await storage.ledger_page(conn, user_id, before_seq=before_seq, limit=limit + 1)
    entries = [_entry_from_row(row) for row in rows[:limit]]
    next_token = _page_token(user_id, rows[limit - 1]["seq"]) if len(rows) > limit else ""
    return LedgerPage(entries, next_token)


def _page_token(user_id: str, last_seq: int) -> str:
    return page_tokens.encode({"u": page_tokens.list_key(user_id), "s": last_seq})


def _page_token_seq(user_id: str, token: str) -> int:
    """The seq a token continues from; InvalidRequest for garbage or another user's token."""
    decoded = page_tokens.decode(token)
    if not isinstance(decoded, dict) or not isinstance(decoded.get("u"), str):
        raise InvalidRequest([("page_token", "is not a token ListLedgerEntries returned")])
    seq = decoded.get("s")
    if type(seq) is not int or not 0 < seq <= _INT64_MAX:
        raise InvalidRequest([("page_token", "is not a token ListLedgerEntries returned")])
    if decoded["u"] != page_tokens.list_key(user_id):
        raise InvalidRequest([("page_token", "belongs to another user's list; list this user without a page_token")])
    return seq


# ---------------------------------------------------------------------------- conversions


def _account_from_row(row: Any) -> Account:
    return Account(
        user_id=row["user_id"],
        plan=Plan(row["plan"]),
        balance=row["balance"],
        storage_used_bytes=row["storage_used_bytes"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _account_answer(row: Any) -> dict[str, Any]:
    account = _account_from_row(row)
    return {
        "user_id": account.user_id,
        "plan": account.plan.value,
        "balance": account.balance,
        "storage_used_bytes": account.storage_used_bytes,
        "created_at": account.created_at.isoformat(),
        "updated_at": account.updated_at.isoformat(),
    }


def _account_from_answer(answer: Mapping[str, Any]) -> Account:
    return Account(
        user_id=answer["user_id"],
        plan=Plan(answer["plan"]),
        balance=answer["balance"],
        storage_used_bytes=answer["storage_used_bytes"],
        created_at=datetime.fromisoformat(answer["created_at"]),
        updated_at=datetime.fromisoformat(answer["updated_at"]),
    )


def _usage_from_row(user_id: str, row: Any) -> Usage:
    return Usage(
        user_id=user_id,
        generations_count=row["generations"],
        generations_success=row["succeeded"],
        generations_failed=row["failed"],
        # PostgreSQL sums in numeric; past int64 (more than 9 million maximal charges) the
        # figure stops at int64's maximum rather than wrapping.
        credits_used=min(int(row["credits_used"]), _INT64_MAX),
        model_usage={model: int(images) for model, images in json.loads(row["model_usage"]).items()},
        storage_used_bytes=row["storage_used_bytes"],
        bytes_generated=min(int(row["bytes_stored"]), _INT64_MAX),
    )


def _usage_answer(usage: Usage) -> dict[str, Any]:
    return {
        "generations_count": usage.generations_count,
        "generations_success": usage.generations_success,
        "generations_failed": usage.generations_failed,
        "credits_used": usage.credits_used,
        "model_usage": usage.model_usage,
        "storage_used_bytes": usage.storage_used_bytes,
        "bytes_generated": usage.bytes_generated,
    }


def _usage_from_answer(user_id: str, answer: Mapping[str, Any]) -> Usage:
    return Usage(user_id=user_id, **answer)


def _entry_from_row(row: Any) -> LedgerEntry:
    return LedgerEntry(
        entry_id=row["entry_id"],
        user_id=row["user_id"],
        kind=LedgerEntryKind(row["kind"]),
        amount=row["amount"],
        balance_after=row["balance_after"],
        reference=row["reference"],
        request_id=row["request_id"],
        refunded_charge_id=row["refund_of"],
        created_at=row["created_at"],
    )

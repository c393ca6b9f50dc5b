"""Credits: accounts, plans and the ledger rules; use cases take their pool as an argument.

Amounts are integers in hundredths of a credit (1 credit = 100), never floats.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.credits import storage

log = logging.getLogger(__name__)

USER_ID_MAX_LENGTH = 128
# 10 credits, as the proto promises every new account.
WELCOME_GRANT = 1000
WELCOME_REFERENCE = "welcome grant"

_GIB = 1024**3


class Plan(enum.Enum):
    FREE = "FREE"
    PRO = "PRO"
    ENTERPRISE = "ENTERPRISE"

    @property
    def storage_quota_bytes(self) -> int:
        return _STORAGE_QUOTA_BYTES[self]


# The contract says "1 GB / 100 GB / 500 GB"; we read GB as binary GiB (1 GiB = 1073741824
# bytes) so that quotas match what storage tools and S3 consoles report.
_STORAGE_QUOTA_BYTES = {
    Plan.FREE: 1 * _GIB,
    Plan.PRO: 100 * _GIB,
    Plan.ENTERPRISE: 500 * _GIB,
}


class LedgerEntryKind(enum.Enum):
    GRANT = "GRANT"
    CHARGE = "CHARGE"
    REFUND = "REFUND"
    ADJUSTMENT = "ADJUSTMENT"


class DomainError(Exception):
    """A request the credits rules refuse; handlers map each subclass to one status code."""


class InvalidArgument(DomainError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class ResourceExhausted(DomainError):
    pass


class Unavailable(DomainError):
    pass


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


def validate_user_id(user_id: str) -> str:
    if not user_id.strip():
        raise InvalidArgument("user_id", "must not be empty")
    if len(user_id) > USER_ID_MAX_LENGTH:
        raise InvalidArgument("user_id", f"must be at most {USER_ID_MAX_LENGTH} characters")
    # PostgreSQL text cannot hold NUL, and control characters in ids only ever mean a bug.
    if any(ord(char) < 32 or ord(char) == 127 for char in user_id):
        raise InvalidArgument("user_id", "must not contain control characters")
    return user_id


def welcome_request_id(user_id: str) -> str:
    return f"welcome:{user_id}"


async def get_account(pool: asyncpg.Pool, user_id: str) -> Account:
    """The user's account, opened on first sight on FREE with the welcome grant."""
    validate_user_id(user_id)
    try:
        async with pool.acquire() as conn:
            row = await storage.fetch_account(conn, user_id)
            if row is None:
                row = await _open_account(conn, user_id)
    except storage.CONNECTION_ERRORS as error:
        log.error("account.read_failed", extra={"user_id": user_id, "error": str(error)})
        raise Unavailable("the credits database is unavailable; try again") from error
    return _account_from_row(row)


async def _open_account(conn: asyncpg.Connection, user_id: str) -> Any:
    # The account and its first ledger entry commit together, so the balance equals the
    # ledger's sum from the very first moment. Concurrent first calls race on the primary
    # key: exactly one insert wins, the others wait for it and then read its row.
    async with conn.transaction():
        opened = await storage.insert_account_if_missing(
            conn, user_id, plan=Plan.FREE.value, balance=WELCOME_GRANT
        )
        if opened:
            await storage.insert_ledger_entry(
                conn,
                user_id=user_id,
                kind=LedgerEntryKind.GRANT.value,
                amount=WELCOME_GRANT,
                balance_after=WELCOME_GRANT,
                reference=WELCOME_REFERENCE,
                request_id=welcome_request_id(user_id),
            )
    row = await storage.fetch_account(conn, user_id)
    if opened:
        log.info("account.opened", extra={"user_id": user_id, "balance": WELCOME_GRANT})
    return row


def _account_from_row(row: Any) -> Account:
    return Account(
        user_id=row["user_id"],
        plan=Plan(row["plan"]),
        balance=row["balance"],
        storage_used_bytes=row["storage_used_bytes"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )

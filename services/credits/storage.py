"""Plain SQL over asyncpg for the credits schema; the caller owns the transaction.

Rows come back as asyncpg records; jsonb goes in and out as text (json.dumps / json.loads
here), so the domain only ever sees dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from shared.db import is_unavailable  # noqa: F401 - the use cases call storage.is_unavailable

# A twin request committed between our read and our write (the unique key on the request
# or its ledger entry said so), or PostgreSQL broke a lock cycle: run the use case again.
RACE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.UniqueViolationError,
    asyncpg.exceptions.TransactionRollbackError,
)


_ACCOUNT_COLUMNS = "user_id, plan, balance, storage_used_bytes, created_at, updated_at"


# ---------------------------------------------------------------------------- accounts


async def fetch_account(conn: asyncpg.Connection, user_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_ACCOUNT_COLUMNS} FROM credits.accounts WHERE user_id = $1", user_id)


async def fetch_accounts(conn: asyncpg.Connection, user_ids: list[str]) -> dict[str, asyncpg.Record]:
    """The accounts of those users that have one, by user_id, in one statement."""
    rows = await conn.fetch(f"SELECT {_ACCOUNT_COLUMNS} FROM credits.accounts WHERE user_id = ANY($1::text[])", user_ids)
    return {row["user_id"]: row for row in rows}


async def lock_account(conn: asyncpg.Connection, user_id: str) -> asyncpg.Record | None:
    """The account, its row locked until the transaction ends; None when there is none.

    FOR NO KEY UPDATE, not FOR UPDATE: it must not wait for the key-share locks that
    foreign-key checks of concurrent inserts take on the same row.
    """
    return await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM credits.accounts WHERE user_id = $1 FOR NO KEY UPDATE", user_id
    )


async def insert_account_if_missing(conn: asyncpg.Connection, user_id: str, *, plan: str, balance: int) -> bool:
    """True when this call created the account; False when it already existed."""
    inserted = await conn.fetchval(
        """
        INSERT INTO credits.accounts (user_id, plan, balance)
        VALUES ($1, $2, $3)
        ON CONFLICT (user_id) DO NOTHING
        RETURNING true
        """,
        user_id,
        plan,
        balance,
    )
    return inserted is True


async def add_to_balance(conn: asyncpg.Connection, user_id: str, amount: int) -> asyncpg.Record:
    """balance += amount (signed) on a locked account; the account afterwards."""
    return await conn.fetchrow(
        f"""
        UPDATE credits.accounts SET balance = balance + $2, updated_at = now()
        WHERE user_id = $1
        RETURNING {_ACCOUNT_COLUMNS}
        """,
        user_id,
        amount,
    )


async def add_to_storage_used(conn: asyncpg.Connection, user_id: str, bytes_delta: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""
        UPDATE credits.accounts SET storage_used_bytes = storage_used_bytes + $2, updated_at = now()
        WHERE user_id = $1
        RETURNING {_ACCOUNT_COLUMNS}
        """,
        user_id,
        bytes_delta,
    )


async def set_plan(conn: asyncpg.Connection, user_id: str, plan: str) -> asyncpg.Record:
    """Changes the plan; updated_at moves only when the plan really changes."""
    return await conn.fetchrow(
        f"""
        UPDATE credits.accounts
        SET plan = $2, updated_at = CASE WHEN plan = $2 THEN updated_at ELSE now() END
        WHERE user_id = $1
        RETURNING {_ACCOUNT_COLUMNS}
        """,
        user_id,
        plan,
    )


# ---------------------------------------------------------------------------- ledger


async def insert_ledger_entry(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    kind: str,
    amount: int,
    balance_after: int,
    reference: str,
    request_id: str,
    refund_of: str | None = None,
) -> asyncpg.Record:
    return await conn.fetchrow(
        """
        INSERT INTO credits.ledger_entries
            (user_id, kind, amount, balance_after, reference, request_id, refund_of)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        RETURNING entry_id::text, created_at
        """,
        user_id,
        kind,
        amount,
        balance_after,
        reference,
        request_id,
        refund_of,
    )


async def fetch_charge(conn: asyncpg.Connection, charge_id: str) -> asyncpg.Record | None:
    """The CHARGE entry `charge_id` names (amount positive here), or None."""
    return await conn.fetchrow(
        """
        SELECT entry_id::text AS charge_id, user_id, -amount AS amount
        FROM credits.ledger_entries
        WHERE entry_id = $1::uuid AND kind = 'CHARGE'
        """,
        charge_id,
    )


async def refunded_so_far(conn: asyncpg.Connection, charge_id: str) -> int:
    return await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM credits.ledger_entries WHERE refund_of = $1::uuid", charge_id
    )


_ENTRY_COLUMNS = """
    entry_id::text AS entry_id, user_id, kind, amount, balance_after, reference, request_id,
    coalesce(refund_of::text, '') AS refund_of, created_at, seq
"""


async def ledger_page(conn: asyncpg.Connection, user_id: str, *, before_seq: int | None, limit: int) -> list[asyncpg.Record]:
    """Newest first; keyed on seq, so pages never skip or repeat an entry, and a deep page
    starts where it begins in the (user_id, seq) index rather than filtering its way there."""
    if before_seq is None:
        return await conn.fetch(
            f"SELECT {_ENTRY_COLUMNS} FROM credits.ledger_entries WHERE user_id = $1 ORDER BY seq DESC LIMIT $2",
            user_id,
            limit,
        )
    return await conn.fetch(
        f"""
        SELECT {_ENTRY_COLUMNS} FROM credits.ledger_entries
        WHERE user_id = $1 AND seq < $2
        ORDER BY seq DESC
        LIMIT $3
        """,
        user_id,
        before_seq,
        limit,
    )


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RecordedRequest:
    user_id: str
    operation: str
    parameters: dict[str, Any]
    outcome: str
    answer: dict[str, Any]


def _recorded(row: asyncpg.Record) -> RecordedRequest | None:
    if row["operation"] is None:
        return None
    return RecordedRequest(
        row["user_id"], row["operation"], json.loads(row["parameters"]), row["outcome"], json.loads(row["answer"])
    )


async def fetch_request(conn: asyncpg.Connection, user_id: str, request_id: str) -> RecordedRequest | None:
    row = await conn.fetchrow(
        "SELECT user_id, operation, parameters, outcome, answer FROM credits.requests"
        " WHERE user_id = $1 AND request_id = $2",
        user_id,
        request_id,
    )
    return None if row is None else _recorded(row)


async def insert_request(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    request_id: str,
    operation: str,
    parameters: dict[str, Any],
    outcome: str,
    answer: dict[str, Any],
) -> None:
    """Raises UniqueViolationError when a twin request was recorded first."""
    await conn.execute(
        """
        INSERT INTO credits.requests (user_id, request_id, operation, parameters, outcome, answer)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        user_id,
        request_id,
        operation,
        json.dumps(parameters),
        outcome,
        json.dumps(answer),
    )


# ---------------------------------------------------------------------------- Charge


def _refilled_tokens(burst: str, rate: str) -> str:
    """SQL for the account's token bucket refilled for the time since its last charge and
    capped at the burst (NULL tokens: never charged, so full); burst and rate name the
    statement's parameters."""
    elapsed = "greatest(0, extract(epoch FROM statement_timestamp() - charge_tokens_at))"
    return f"least({burst}::numeric, coalesce(charge_tokens + {rate}::numeric * {elapsed}, {burst}::numeric))"


@dataclass(frozen=True)
class ChargeAttempt:
    """What the one-statement charge did: replayed a record, or charged, or neither."""

    prior: RecordedRequest | None
    charge_id: str | None
    balance: int | None


_CHARGE_SQL = f"""
-- The user's own request with this key, else another user's charge with it (a charge's
-- request_id is unique across users).
WITH prior AS (
    SELECT user_id, operation, parameters, outcome, answer FROM credits.requests
    WHERE request_id = $2 AND (user_id = $1 OR operation = 'CHARGE')
    ORDER BY user_id = $1 DESC
    LIMIT 1
),
-- The conditional debit, which also takes a token from the account's bucket. Concurrent
-- charges queue on the row lock and each re-checks the balance and the bucket it finds, so
-- none can take the balance below zero or pass the rate. A replay moves nothing.
debit AS (
    UPDATE credits.accounts
    SET balance = balance - $3::bigint, updated_at = now(),
        charge_tokens = {_refilled_tokens("$5", "$6")} - 1, charge_tokens_at = statement_timestamp()
    WHERE user_id = $1 AND balance >= $3::bigint AND {_refilled_tokens("$5", "$6")} >= 1
      AND NOT EXISTS (SELECT FROM prior)
    RETURNING balance
),
entry AS (
    INSERT INTO credits.ledger_entries (user_id, kind, amount, balance_after, reference, request_id)
    SELECT $1, 'CHARGE', -$3::bigint, balance, $4, $2 FROM debit
    RETURNING entry_id, balance_after
),
-- A twin request racing this one makes this insert (or the ledger's) fail on its unique
-- key, which rolls the whole statement back; the caller then finds the twin's record.
remembered AS (
    INSERT INTO credits.requests (user_id, request_id, operation, parameters, outcome, answer)
    SELECT $1, $2, 'CHARGE', $7::jsonb, 'DONE',
           jsonb_build_object('charge_id', entry_id::text, 'balance', balance_after)
    FROM entry
)
SELECT prior.user_id, prior.operation, prior.parameters, prior.outcome, prior.answer,
       (SELECT entry_id::text FROM entry) AS charge_id,
       (SELECT balance_after FROM entry) AS balance
FROM (SELECT) AS one LEFT JOIN prior ON true
"""


async def charge(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    request_id: str,
    amount: int,
    reference: str,
    parameters: dict[str, Any],
    burst: int,
    rate_per_second: Decimal,
) -> ChargeAttempt:
    """Replay check, rate limit, conditional debit, ledger entry and request record in ONE
    statement: one round trip, and the account's row lock is held only while it runs, which
    is what bounds the charges per second one hot account can take."""
    row = await conn.fetchrow(
        _CHARGE_SQL, user_id, request_id, amount, reference, burst, rate_per_second, json.dumps(parameters)
    )
    return ChargeAttempt(prior=_recorded(row), charge_id=row["charge_id"], balance=row["balance"])


@dataclass(frozen=True)
class AskedCharge:
    """One Charge call's arguments, as a batch of charges carries them."""

    user_id: str
    request_id: str
    amount: int
    reference: str


# The one-statement charge above for many calls at once. Each asked charge is its own row of
# `asked`: its replay check, its conditional debit (the account's row lock and re-check, as
# above), its ledger entry and its record. The lone charge keeps its own, scalar statement:
# run as a batch of one, a hot account's charges (which always go alone) held its row lock
# longer and fell from about 700 to 310 per second in the credits bench. A change to the
# charge's rules goes into both. The caller sends each user and each request_id at
# most once per batch: one UPDATE cannot move a row twice, and a repeated key would fail the
# whole statement on the unique indexes.
_CHARGE_MANY_SQL = f"""
WITH asked AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $7::text[])
        AS asked(user_id, request_id, amount, reference, parameters)
),
prior AS (
    SELECT DISTINCT ON (asked.request_id) asked.request_id AS asked_request_id,
           r.user_id, r.operation, r.parameters, r.outcome, r.answer
    FROM asked JOIN credits.requests AS r
      ON r.request_id = asked.request_id AND (r.user_id = asked.user_id OR r.operation = 'CHARGE')
    ORDER BY asked.request_id, r.user_id = asked.user_id DESC
),
debit AS (
    UPDATE credits.accounts AS account
    SET balance = account.balance - asked.amount, updated_at = now(),
        charge_tokens = {_refilled_tokens("$5", "$6")} - 1, charge_tokens_at = statement_timestamp()
    FROM asked
    WHERE account.user_id = asked.user_id AND account.balance >= asked.amount
      AND {_refilled_tokens("$5", "$6")} >= 1
      AND NOT EXISTS (SELECT FROM prior WHERE prior.asked_request_id = asked.request_id)
    RETURNING asked.request_id, account.balance
),
entry AS (
    INSERT INTO credits.ledger_entries (user_id, kind, amount, balance_after, reference, request_id)
    SELECT asked.user_id, 'CHARGE', -asked.amount, debit.balance, asked.reference, asked.request_id
    FROM debit JOIN asked USING (request_id)
    RETURNING entry_id, user_id, request_id, balance_after
),
remembered AS (
    INSERT INTO credits.requests (user_id, request_id, operation, parameters, outcome, answer)
    SELECT entry.user_id, entry.request_id, 'CHARGE', asked.parameters::jsonb, 'DONE',
           jsonb_build_object('charge_id', entry.entry_id::text, 'balance', entry.balance_after)
    FROM entry JOIN asked USING (request_id)
)
SELECT asked.request_id AS asked_request_id,
       prior.user_id, prior.operation, prior.parameters, prior.outcome, prior.answer,
       entry.entry_id::text AS charge_id, entry.balance_after AS balance
FROM asked
LEFT JOIN prior ON prior.asked_request_id = asked.request_id
LEFT JOIN entry ON entry.request_id = asked.request_id
"""


async def charge_many(
    conn: asyncpg.Connection,
    asked: list[AskedCharge],
    *,
    parameters: list[dict[str, Any]],
    burst: int,
    rate_per_second: Decimal,
) -> dict[AskedCharge, ChargeAttempt]:
    """`charge` for each asked charge (its record's parameters at the same index), in one
    statement and one round trip. Each user and each request_id at most once in `asked`."""
    rows = await conn.fetch(
        _CHARGE_MANY_SQL,
        [charge.user_id for charge in asked],
        [charge.request_id for charge in asked],
        [charge.amount for charge in asked],
        [charge.reference for charge in asked],
        burst,
        rate_per_second,
        [json.dumps(each) for each in parameters],
    )
    by_request = {charge.request_id: charge for charge in asked}
    return {
        by_request[row["asked_request_id"]]: ChargeAttempt(
            prior=_recorded(row), charge_id=row["charge_id"], balance=row["balance"]
        )
        for row in rows
    }


@dataclass(frozen=True)
class ChargeRefusal:
    """Why a charge that moved nothing did not: read under the account's lock."""

    balance: int
    has_token: bool
    seconds_until_token: float


async def lock_for_refusal(
    conn: asyncpg.Connection, user_id: str, *, burst: int, rate_per_second: Decimal
) -> ChargeRefusal | None:
    """The account's balance and bucket, its row locked; None when there is no account."""
    tokens = _refilled_tokens("$2", "$3")
    row = await conn.fetchrow(
        f"""
        SELECT balance, {tokens} >= 1 AS has_token, greatest(0, (1 - {tokens}) / $3::numeric) AS seconds_until_token
        FROM credits.accounts WHERE user_id = $1
        FOR NO KEY UPDATE
        """,
        user_id,
        burst,
        rate_per_second,
    )
    if row is None:
        return None
    return ChargeRefusal(row["balance"], row["has_token"], float(row["seconds_until_token"]))


async def take_charge_token(conn: asyncpg.Connection, user_id: str, *, burst: int, rate_per_second: Decimal) -> None:
    """A refused charge costs its token too, so refusals are rate-limited like charges."""
    await conn.execute(
        f"""
        UPDATE credits.accounts
        SET charge_tokens = greatest(0, {_refilled_tokens("$2", "$3")} - 1), charge_tokens_at = statement_timestamp()
        WHERE user_id = $1
        """,
        user_id,
        burst,
        rate_per_second,
    )


async def remember_insufficient_credits(
    conn: asyncpg.Connection, *, user_id: str, request_id: str, balance: int, amount: int, parameters: dict[str, Any]
) -> dict[str, Any] | None:
    """Records the refusal; None when a twin request was recorded first."""
    answer = await conn.fetchval(
        """
        INSERT INTO credits.requests (user_id, request_id, operation, parameters, outcome, answer)
        VALUES ($1, $2, 'CHARGE', $5::jsonb, 'INSUFFICIENT_CREDITS', jsonb_build_object('balance', $3::bigint, 'cost', $4::bigint))
        ON CONFLICT (user_id, request_id) DO NOTHING
        RETURNING answer
        """,
        user_id,
        request_id,
        balance,
        amount,
        json.dumps(parameters),
    )
    return None if answer is None else json.loads(answer)


# ---------------------------------------------------------------------------- storage


async def insert_storage_entry(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    kind: str,
    bytes_delta: int,
    used_after: int,
    quota_bytes: int,
    request_id: str,
) -> None:
    await conn.execute(
        """
        INSERT INTO credits.storage_entries (user_id, kind, bytes, used_after, quota_bytes, request_id)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        user_id,
        kind,
        bytes_delta,
        used_after,
        quota_bytes,
        request_id,
    )


# ---------------------------------------------------------------------------- usage


async def fetch_generation(conn: asyncpg.Connection, user_id: str, job_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """
        SELECT model, images_requested, images_delivered, bytes_stored, answer
        FROM credits.generations WHERE user_id = $1 AND job_id = $2
        """,
        user_id,
        job_id,
    )


async def insert_generation(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    job_id: str,
    model: str,
    images_requested: int,
    images_delivered: int,
    bytes_stored: int,
    request_id: str,
    answer: dict[str, Any],
) -> None:
    await conn.execute(
        """
        INSERT INTO credits.generations
            (user_id, job_id, model, images_requested, images_delivered, bytes_stored, request_id, answer)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        """,
        user_id,
        job_id,
        model,
        images_requested,
        images_delivered,
        bytes_stored,
        request_id,
        json.dumps(answer),
    )


async def set_generation_answer(conn: asyncpg.Connection, user_id: str, job_id: str, answer: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE credits.generations SET answer = $3 WHERE user_id = $1 AND job_id = $2",
        user_id,
        job_id,
        json.dumps(answer),
    )


async def usage_totals(conn: asyncpg.Connection, user_id: str) -> asyncpg.Record | None:
    """Every usage figure of the user in one statement, so all come from one snapshot.

    credits_used is numeric (PostgreSQL's sum of bigint), so it cannot overflow here.
    """
    return await conn.fetchrow(
        """
        SELECT a.storage_used_bytes,
               (SELECT coalesce(-sum(amount), 0) FROM credits.ledger_entries
                WHERE user_id = $1 AND kind IN ('CHARGE', 'REFUND')) AS credits_used,
               g.generations, g.succeeded, g.failed, g.bytes_stored,
               (SELECT coalesce(jsonb_object_agg(model, images), '{}'::jsonb)::text
                FROM (SELECT model, sum(images_delivered) AS images FROM credits.generations
                      WHERE user_id = $1 GROUP BY model) AS per_model) AS model_usage
        FROM credits.accounts AS a,
             LATERAL (SELECT count(*) AS generations,
                             count(*) FILTER (WHERE images_delivered > 0) AS succeeded,
                             count(*) FILTER (WHERE images_delivered = 0) AS failed,
                             coalesce(sum(bytes_stored), 0) AS bytes_stored
                      FROM credits.generations WHERE user_id = $1) AS g
        WHERE a.user_id = $1
        """,
        user_id,
    )

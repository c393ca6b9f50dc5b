"""Plain SQL over asyncpg for the credits schema; the caller owns the transaction."""

from __future__ import annotations

import asyncpg

# What a lost or refused database connection raises; the use cases report these as
# "unavailable" rather than as a bug. OSError covers a refused or reset TCP connection.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
)

_ACCOUNT_COLUMNS = "user_id, plan, balance, storage_used_bytes, created_at, updated_at"


async def fetch_account(conn: asyncpg.Connection, user_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM credits.accounts WHERE user_id = $1", user_id
    )


async def insert_account_if_missing(
    conn: asyncpg.Connection, user_id: str, *, plan: str, balance: int
) -> bool:
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


async def insert_ledger_entry(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    kind: str,
    amount: int,
    balance_after: int,
    reference: str,
    request_id: str,
) -> asyncpg.Record:
    return await conn.fetchrow(
        """
        INSERT INTO credits.ledger_entries
            (user_id, kind, amount, balance_after, reference, request_id)
        VALUES ($1, $2, $3, $4, $5, $6)
        RETURNING entry_id, created_at
        """,
        user_id,
        kind,
        amount,
        balance_after,
        reference,
        request_id,
    )

"""Accounts over real gRPC and a real PostgreSQL database: opening, callers, the database's own guards."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.auth import bearer_metadata

from .helpers import ONE_GIB, CreditsUnderTest, count_rows, postgres_proxy, serve_credits, through_proxy


async def get_account(credits: CreditsUnderTest, user_id: str, caller: str = "gateway") -> pb.Account:
    response = await credits.stub.GetAccount(
        pb.GetAccountRequest(user_id=user_id), metadata=credits.as_caller(caller), timeout=10
    )
    return response.account


async def ledger_rows(db: asyncpg.Connection, user_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT kind, amount, balance_after, request_id FROM credits.ledger_entries"
        " WHERE user_id = $1",
        user_id,
    )


async def accounts_and_entries(db: asyncpg.Connection) -> tuple[int, int]:
    rows = await count_rows(db)
    return rows["accounts"], rows["ledger_entries"]


async def test_first_get_account_opens_free_account_with_welcome_grant(credits, db):
    account = await get_account(credits, "player-1")

    assert account.user_id == "player-1"
    assert account.plan == pb.PLAN_FREE
    assert account.balance == 1000
    assert account.storage_used_bytes == 0
    assert account.storage_quota_bytes == ONE_GIB
    assert account.create_time.seconds > 0
    rows = await ledger_rows(db, "player-1")
    assert [(r["kind"], r["amount"], r["balance_after"], r["request_id"]) for r in rows] == [
        ("GRANT", 1000, 1000, "welcome:player-1")
    ]
    assert sum(r["amount"] for r in rows) == account.balance


async def test_second_get_account_returns_the_same_account_and_writes_nothing(credits, db):
    first = await get_account(credits, "player-2", caller="gateway")
    second = await get_account(credits, "player-2", caller="image")

    assert second == first
    assert await accounts_and_entries(db) == (1, 1)


async def wait_for_lock_waiters(db: asyncpg.Connection, table: str, count: int) -> None:
    """Returns once `count` sessions wait for a lock on `table`, or after 5 s regardless."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted", table
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.02)


async def test_concurrent_first_calls_open_one_account_with_one_grant(credits, db):
    # Holding SHARE on accounts lets the calls read (and find no account) but parks each of
    # them at its INSERT, so they really race instead of running one after another.
    async with db.transaction():
        await db.execute("LOCK TABLE credits.accounts IN SHARE MODE")
        calls = asyncio.gather(*(get_account(credits, "racer") for _ in range(20)))
        await wait_for_lock_waiters(db, "credits.accounts", count=5)
    accounts = await calls

    assert {account.balance for account in accounts} == {1000}
    assert len({account.create_time.ToNanoseconds() for account in accounts}) == 1
    assert await accounts_and_entries(db) == (1, 1)
    assert await db.fetchval("SELECT balance FROM credits.accounts WHERE user_id = 'racer'") == 1000


async def test_longest_allowed_user_id_is_accepted(credits):
    user_id = "u" * 128

    account = await get_account(credits, user_id, caller="admin")

    assert account.user_id == user_id


@pytest.mark.parametrize(
    ("user_id", "message"),
    [
        ("", "user_id: must not be empty"),
        ("   ", "user_id: must not start or end with whitespace"),
        (" u1", "user_id: must not start or end with whitespace"),
        ("u" * 129, "user_id: must be at most 128 characters"),
        ("bad\x00id", "user_id: must not contain control characters"),
    ],
)
async def test_bad_user_id_is_invalid_argument_and_writes_nothing(credits, db, user_id, message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_account(credits, user_id)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message
    assert await accounts_and_entries(db) == (0, 0)


async def test_caller_not_in_the_table_is_permission_denied(credits, db):
    with pytest.raises(grpc.aio.AioRpcError) as charge:
        await credits.stub.Charge(
            pb.ChargeRequest(user_id="u", amount=100, reference="job:1", request_id="r1"),
            metadata=credits.as_caller("gateway"),
            timeout=10,
        )
    with pytest.raises(grpc.aio.AioRpcError) as story_reads_account:
        await get_account(credits, "u", caller="story")

    assert charge.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert story_reads_account.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await accounts_and_entries(db) == (0, 0)


@pytest.mark.parametrize(
    "metadata",
    [(), bearer_metadata("not-a-known-token"), (("authorization", "Basic Zm9vOmJhcg=="),)],
    ids=["no-token", "unknown-token", "not-bearer"],
)
async def test_call_without_a_known_token_is_unauthenticated(credits, db, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.stub.GetAccount(
            pb.GetAccountRequest(user_id="u"), metadata=metadata, timeout=10
        )

    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await accounts_and_entries(db) == (0, 0)


async def test_database_refuses_to_change_or_delete_ledger_entries(credits, db):
    await get_account(credits, "auditor")

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="credits.ledger_entries is append-only"):
        await db.execute("UPDATE credits.ledger_entries SET amount = 5000")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("DELETE FROM credits.ledger_entries")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("TRUNCATE credits.ledger_entries CASCADE")

    rows = await ledger_rows(db, "auditor")
    assert [(r["kind"], r["amount"]) for r in rows] == [("GRANT", 1000)]


@pytest.mark.parametrize("table", ["requests", "storage_entries"])
async def test_database_refuses_to_change_or_delete_request_records_and_storage_moves(credits, db, table):
    await get_account(credits, "auditor")
    await credits.call("ReserveStorage", pb.ReserveStorageRequest(user_id="auditor", bytes=10, request_id="r-1"),
                       "image")

    for statement in (f"UPDATE credits.{table} SET user_id = user_id", f"DELETE FROM credits.{table}",
                      f"TRUNCATE credits.{table}"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"credits.{table} is append-only"):
            await db.execute(statement)


async def test_database_refuses_a_negative_balance(credits, db):
    await get_account(credits, "saver")

    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE credits.accounts SET balance = -1 WHERE user_id = 'saver'")


async def test_health_answers_serving_without_a_token(credits):
    health = health_pb2_grpc.HealthStub(credits.channel)

    response = await health.Check(
        health_pb2.HealthCheckRequest(service="casefile.credits.v1.CreditsService"), timeout=10
    )

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_database_outage_is_unavailable_and_service_recovers(database_url, auth_tokens, db):
    async with postgres_proxy(database_url) as proxy:
        async with serve_credits(through_proxy(database_url, proxy), auth_tokens) as credits:
            await get_account(credits, "before-outage")

            await proxy.cut()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await get_account(credits, "during-outage")
            await proxy.restore()
            after = await get_account(credits, "during-outage")

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "database" in raised.value.details()
    assert after.balance == 1000
    assert await accounts_and_entries(db) == (2, 2)

"""The credits service over real gRPC and a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from services.credits.config import Config
from services.credits.main import build
from shared.auth import bearer_metadata
from tests.fakes.tcp_proxy import TcpProxy

ONE_GIB = 1073741824


@dataclass
class CreditsUnderTest:
    stub: pb_grpc.CreditsServiceStub
    channel: grpc.aio.Channel
    tokens: dict[str, str]

    def as_caller(self, caller: str) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.tokens[caller])


@contextlib.asynccontextmanager
async def serve_credits(
    database_url: str, tokens: dict[str, str]
) -> AsyncIterator[CreditsUnderTest]:
    """The service as main.build() wires it, on a free port, with a stub over loopback."""
    config = Config.from_env(
        {
            "CREDITS_ADDR": "127.0.0.1:0",
            "DATABASE_URL": database_url,
            "AUTH_TOKENS": ",".join(f"{caller}:{token}" for caller, token in tokens.items()),
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        running = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stack.push_async_callback(channel.close)
        yield CreditsUnderTest(pb_grpc.CreditsServiceStub(channel), channel, tokens)


@pytest.fixture
async def credits(
    database_url: str, auth_tokens: dict[str, str]
) -> AsyncIterator[CreditsUnderTest]:
    async with serve_credits(database_url, auth_tokens) as service:
        yield service


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def get_account(
    credits: CreditsUnderTest, user_id: str, caller: str = "gateway"
) -> pb.Account:
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


async def count_rows(db: asyncpg.Connection) -> tuple[int, int]:
    accounts = await db.fetchval("SELECT count(*) FROM credits.accounts")
    entries = await db.fetchval("SELECT count(*) FROM credits.ledger_entries")
    return accounts, entries


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
    assert await count_rows(db) == (1, 1)


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
    assert await count_rows(db) == (1, 1)
    assert await db.fetchval("SELECT balance FROM credits.accounts WHERE user_id = 'racer'") == 1000


async def test_longest_allowed_user_id_is_accepted(credits):
    user_id = "u" * 128

    account = await get_account(credits, user_id, caller="admin")

    assert account.user_id == user_id


@pytest.mark.parametrize(
    ("user_id", "message"),
    [
        ("", "user_id: must not be empty"),
        ("   ", "user_id: must not be empty"),
        ("u" * 129, "user_id: must be at most 128 characters"),
        ("bad\x00id", "user_id: must not contain control characters"),
    ],
)
async def test_bad_user_id_is_invalid_argument_and_writes_nothing(credits, db, user_id, message):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await get_account(credits, user_id)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == message
    assert await count_rows(db) == (0, 0)


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
    assert await count_rows(db) == (0, 0)


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
    assert await count_rows(db) == (0, 0)


@pytest.mark.parametrize(
    ("method", "request_message", "caller"),
    [
        ("Grant", pb.GrantRequest(user_id="u", amount=1, reason="r", request_id="r"), "admin"),
        ("SetPlan", pb.SetPlanRequest(user_id="u", plan=pb.PLAN_PRO), "admin"),
        ("Charge", pb.ChargeRequest(user_id="u", amount=1, reference="r", request_id="r"), "image"),
        ("Refund", pb.RefundRequest(charge_id="c", amount=1, request_id="r"), "admin"),
        ("ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=1, request_id="r"), "image"),
        ("ReleaseStorage", pb.ReleaseStorageRequest(user_id="u", bytes=1, request_id="r"), "image"),
        ("RecordGeneration", pb.RecordGenerationRequest(user_id="u", job_id="j"), "image"),
        ("GetUsage", pb.GetUsageRequest(user_id="u"), "gateway"),
        ("ListLedgerEntries", pb.ListLedgerEntriesRequest(user_id="u"), "admin"),
    ],
)
async def test_methods_not_built_yet_are_unimplemented(credits, method, request_message, caller):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await getattr(credits.stub, method)(
            request_message, metadata=credits.as_caller(caller), timeout=10
        )

    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.details() == f"{method} is not implemented yet"


async def test_database_refuses_to_change_or_delete_ledger_entries(credits, db):
    await get_account(credits, "auditor")

    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("UPDATE credits.ledger_entries SET amount = 5000")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("DELETE FROM credits.ledger_entries")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await db.execute("TRUNCATE credits.ledger_entries CASCADE")

    rows = await ledger_rows(db, "auditor")
    assert [(r["kind"], r["amount"]) for r in rows] == [("GRANT", 1000)]


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


def through_proxy(database_url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{proxy.address}" if user else proxy.address
    return urlunsplit(parts._replace(netloc=netloc))


async def test_database_outage_is_unavailable_and_service_recovers(database_url, auth_tokens, db):
    parts = urlsplit(database_url)
    async with TcpProxy(parts.hostname, parts.port or 5432) as proxy:
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
    assert await count_rows(db) == (2, 2)

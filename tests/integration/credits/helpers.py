"""What the credits tests share: the service on a free port, calls as a caller, the ledger audit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from services.credits.config import Config
from services.credits.main import build
from shared.auth import bearer_metadata
from shared.grpc_errors import ErrorDetails, details_of
from tests.fakes.tcp_proxy import TcpProxy
from tools.infra import free_port

ONE_GIB = 1073741824
CALL_TIMEOUT_S = 10
# What a child process needs from our environment; nothing else leaks in.
INHERITED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


@dataclass
class CreditsUnderTest:
    stub: pb_grpc.CreditsServiceStub
    channel: grpc.aio.Channel
    tokens: dict[str, str]
    # host:port the service listens on (for other services under test to call it).
    addr: str = ""

    def as_caller(self, caller: str) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.tokens[caller])

    async def call(self, method: str, request: Any, caller: str = "admin") -> Any:
        return await getattr(self.stub, method)(request, metadata=self.as_caller(caller), timeout=CALL_TIMEOUT_S)

    async def call_with_trailers(self, method: str, request: Any, caller: str = "admin") -> tuple[Any, dict[str, str]]:
        call = getattr(self.stub, method)(request, metadata=self.as_caller(caller), timeout=CALL_TIMEOUT_S)
        response = await call
        return response, dict(await call.trailing_metadata() or ())

    async def refused(self, method: str, request: Any, caller: str = "admin") -> ErrorDetails:
        """The details of the error the call must end with."""
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await self.call(method, request, caller)
        return details_of(raised.value)

    async def grant(self, user_id: str, amount: int, request_id: str, reason: str = "top-up") -> pb.Account:
        request = pb.GrantRequest(user_id=user_id, amount=amount, reason=reason, request_id=request_id)
        return (await self.call("Grant", request)).account

    async def charge(self, user_id: str, amount: int, request_id: str, reference: str = "job:1") -> pb.ChargeResponse:
        request = pb.ChargeRequest(user_id=user_id, amount=amount, reference=reference, request_id=request_id)
        return await self.call("Charge", request, "image")

    async def refund(self, charge_id: str, amount: int, request_id: str, reason: str = "provider failed") -> pb.RefundResponse:
        request = pb.RefundRequest(charge_id=charge_id, amount=amount, reason=reason, request_id=request_id)
        return await self.call("Refund", request, "image")

    async def account(self, user_id: str) -> pb.Account:
        return (await self.call("GetAccount", pb.GetAccountRequest(user_id=user_id), "gateway")).account


def service_env(database_url: str, tokens: dict[str, str], **overrides: str) -> dict[str, str]:
    """The environment of a credits process (or of Config.from_env) for this test."""
    return {
        **{name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ},
        "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
        "DATABASE_URL": database_url,
        "AUTH_TOKENS": ",".join(f"{caller}:{token}" for caller, token in tokens.items()),
        **overrides,
    }


@contextlib.asynccontextmanager
async def serve_credits(database_url: str, tokens: dict[str, str], **env: str) -> AsyncIterator[CreditsUnderTest]:
    """The service as main.build() wires it, on a free port, with a stub over loopback."""
    config = Config.from_env(service_env(database_url, tokens, CREDITS_ADDR="127.0.0.1:0", **env))
    async with contextlib.AsyncExitStack() as stack:
        running = await build(config, stack)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        stack.push_async_callback(channel.close)
        yield CreditsUnderTest(pb_grpc.CreditsServiceStub(channel), channel, tokens, f"127.0.0.1:{running.port}")


@contextlib.asynccontextmanager
async def credits_client(addr: str, tokens: dict[str, str]) -> AsyncIterator[CreditsUnderTest]:
    """A stub for a credits process listening on `addr`."""
    async with grpc.aio.insecure_channel(addr) as channel:
        yield CreditsUnderTest(pb_grpc.CreditsServiceStub(channel), channel, tokens)


def through_proxy(database_url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(database_url)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@{proxy.address}" if user else proxy.address
    return urlunsplit(parts._replace(netloc=netloc))


def postgres_proxy(database_url: str) -> TcpProxy:
    """A TCP proxy in front of the PostgreSQL `database_url` names (start it, then cut it)."""
    parts = urlsplit(database_url)
    return TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)


async def count_rows(db: asyncpg.Connection) -> dict[str, int]:
    """How many rows each credits table holds: "nothing written" is this, unchanged."""
    tables = ("accounts", "ledger_entries", "requests", "storage_entries", "generations")
    return {table: await db.fetchval(f"SELECT count(*) FROM credits.{table}") for table in tables}


# ---------------------------------------------------------------------------- the audit

# Each query lists what breaks one rule of the ledger; an empty answer means it holds.
_LEDGER_RULES = {
    "balance is the sum of the account's entries": """
        SELECT a.user_id, a.balance, coalesce(sum(e.amount), 0) AS entries_sum
        FROM credits.accounts a LEFT JOIN credits.ledger_entries e USING (user_id)
        GROUP BY a.user_id, a.balance HAVING a.balance <> coalesce(sum(e.amount), 0)
    """,
    "each balance_after is the running sum in seq order": """
        SELECT user_id, seq, balance_after, running FROM (
            SELECT user_id, seq, balance_after, sum(amount) OVER (PARTITION BY user_id ORDER BY seq) AS running
            FROM credits.ledger_entries) AS chain
        WHERE running <> balance_after
    """,
    "storage in use is the sum of the storage entries": """
        SELECT a.user_id, a.storage_used_bytes, coalesce(sum(s.bytes), 0) AS entries_sum
        FROM credits.accounts a LEFT JOIN credits.storage_entries s USING (user_id)
        GROUP BY a.user_id, a.storage_used_bytes HAVING a.storage_used_bytes <> coalesce(sum(s.bytes), 0)
    """,
    "each used_after is the running storage sum in seq order": """
        SELECT user_id, seq, used_after, running FROM (
            SELECT user_id, seq, used_after, sum(bytes) OVER (PARTITION BY user_id ORDER BY seq) AS running
            FROM credits.storage_entries) AS chain
        WHERE running <> used_after OR used_after < 0
    """,
    "storage is never negative, and every reservation stayed within its quota": """
        SELECT user_id, storage_used_bytes FROM credits.accounts WHERE storage_used_bytes < 0
        UNION ALL
        SELECT user_id, used_after FROM credits.storage_entries WHERE kind = 'RESERVE' AND used_after > quota_bytes
    """,
    "refunds of a charge are at most the charge, to the charge's user": """
        SELECT c.entry_id, -c.amount AS charged, sum(r.amount) AS refunded
        FROM credits.ledger_entries c JOIN credits.ledger_entries r ON r.refund_of = c.entry_id
        GROUP BY c.entry_id, c.amount, c.kind, c.user_id
        HAVING sum(r.amount) > -c.amount OR c.kind <> 'CHARGE' OR bool_or(r.user_id <> c.user_id)
    """,
    "every entry has its request, recorded as done by the right method": """
        SELECT e.entry_id, e.kind, q.operation, q.outcome
        FROM credits.ledger_entries e
        LEFT JOIN credits.requests q ON q.user_id = e.user_id AND q.request_id = e.request_id
        WHERE q.outcome IS DISTINCT FROM 'DONE'
           OR q.operation <> CASE WHEN e.kind = 'GRANT' AND e.request_id = 'welcome:' || e.user_id THEN 'WELCOME_GRANT'
                                  ELSE e.kind END
    """,
    "every money request done has its entry; none refused has one": """
        SELECT q.user_id, q.request_id, q.operation, q.outcome
        FROM credits.requests q
        LEFT JOIN credits.ledger_entries e ON e.user_id = q.user_id AND e.request_id = q.request_id
        WHERE q.operation IN ('WELCOME_GRANT', 'GRANT', 'CHARGE', 'REFUND')
          AND (q.outcome = 'DONE') <> (e.entry_id IS NOT NULL)
    """,
    "a charge's recorded answer is its entry": """
        SELECT q.request_id, q.answer, e.entry_id, e.balance_after, e.amount
        FROM credits.requests q JOIN credits.ledger_entries e ON e.user_id = q.user_id AND e.request_id = q.request_id
        WHERE q.operation = 'CHARGE'
          AND ((q.answer->>'charge_id')::uuid <> e.entry_id OR (q.answer->>'balance')::bigint <> e.balance_after
               OR (q.parameters->>'amount')::bigint <> -e.amount OR q.parameters->>'reference' <> e.reference)
    """,
    "every storage request done has its entry; none refused has one": """
        SELECT q.user_id, q.request_id, q.operation, q.outcome
        FROM credits.requests q
        LEFT JOIN credits.storage_entries s ON s.user_id = q.user_id AND s.request_id = q.request_id
        WHERE q.operation IN ('RESERVE_STORAGE', 'RELEASE_STORAGE') AND (q.outcome = 'DONE') <> (s.entry_id IS NOT NULL)
    """,
    "every recorded generation has its answer": """
        SELECT user_id, job_id FROM credits.generations WHERE answer = '{}'::jsonb
    """,
}


async def ledger_problems(database_url: str) -> list[str]:
    """Every broken ledger rule in the database, with the rows that break it."""
    conn = await asyncpg.connect(database_url)
    try:
        if not await conn.fetchval("SELECT to_regclass('credits.requests') IS NOT NULL"):
            return []
        problems = []
        for rule, query in _LEDGER_RULES.items():
            rows = await conn.fetch(query)
            if rows:
                problems.append(f"{rule}: {[dict(row) for row in rows[:5]]}")
        return problems
    finally:
        await conn.close()


async def assert_ledger_holds(database_url: str) -> None:
    problems = await ledger_problems(database_url)
    assert not problems, "the ledger is broken:\n" + "\n".join(problems)

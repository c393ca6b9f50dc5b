"""Charge through the credits service against the raw debit it wraps, and on one hot account.

The credits service runs as a real process on a fresh database. The baseline is the bare
transaction the same client sends straight to PostgreSQL over asyncpg: the conditional
UPDATE of the balance and the ledger INSERT, with a pool made as the service makes its own
(same size, no reset query on release), so that only the transaction is left. What the
service adds on top (gRPC, auth, validation, the idempotency record, the rate limit, the
log line) is what the ratio measures. Rounds alternate so that machine noise hits both.

A third contender shows how far the parts underneath can go: tests.bench.debit_server, a
bare grpc.aio server running the same debit as one statement over asyncpg and nothing else.
Its ratio to the raw transaction is the ceiling for any grpc.aio service doing a charge on
this machine; Charge's ratio to it is what the credits service's own work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import asyncpg
import grpc

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from services.credits.config import Config
from tests.bench import debit_server
from tests.bench.harness import (
    AS_ADMIN,
    AS_IMAGE,
    alternating_rates,
    base_env,
    bench_database,
    calls_per_second,
    paired,
    paired_rates,
)
from tests.bench.report import Figure, ratio_figure
from shared.db import create_pool
from tools.infra import ServiceProcess, free_port, wait_for_tcp

CHARGE_AIM = "ratio >= 0.6"
# As many connections as the service's own pool, so the ratio is about the service's work.
POOL_SIZE = Config.db_pool_max_size
# A balance no bench run can spend, at the largest amount one Grant may add.
FUNDING = 10**12

_RAW_DEBIT = """
UPDATE credits.accounts SET balance = balance - $2, updated_at = now()
WHERE user_id = $1 AND balance >= $2
RETURNING balance
"""
_RAW_ENTRY = """
INSERT INTO credits.ledger_entries (user_id, kind, amount, balance_after, reference, request_id)
VALUES ($1, 'CHARGE', -$2::bigint, $3, 'bench', $4)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("credits")
    group.add_argument("--credits-concurrency", type=int, default=16, help="Charge calls in flight against the raw debit")
    group.add_argument("--hot-callers", type=int, default=64, help="callers in the hot-row comparison")
    group.add_argument("--accounts", type=int, default=1000, help="accounts the spread-out callers charge")


async def run(args: argparse.Namespace) -> list[Figure]:
    work = Path(tempfile.mkdtemp(prefix="casefile-bench-credits-"))
    async with bench_database() as database_url:
        env = {
            **base_env(database_url),
            "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
            # The bench measures charges, not the limiter's refusals.
            "CHARGE_RATE_PER_SECOND": "1000000000",
            "CHARGE_BURST": "1000000000",
        }
        service = ServiceProcess("credits", env, work / "credits.log").start()
        bare_port = free_port()
        bare = ServiceProcess(
            "debit", env, work / "debit.log",
            argv=[sys.executable, "-m", "tests.bench.debit_server", str(bare_port), database_url, str(POOL_SIZE)],
        )
        try:
            await service.wait_healthy(env["CREDITS_ADDR"])  # it migrates the database the others use
            bare.start()
            await wait_for_tcp("127.0.0.1", bare_port, 15)
            async with grpc.aio.insecure_channel(env["CREDITS_ADDR"]) as channel, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}") as bare_channel:
                # Configured as the service's pool (shared.db.create_pool, no reset query).
                pool = await create_pool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                         application_name="casefile-bench-raw", reset_session_state=False)
                try:
                    bare_charge = bare_channel.unary_unary(
                        debit_server.METHOD, request_serializer=pb.ChargeRequest.SerializeToString,
                        response_deserializer=pb.ChargeResponse.FromString,
                    )
                    return await measure(pb_grpc.CreditsServiceStub(channel), bare_charge, pool, args)
                finally:
                    await pool.close()
        finally:
            bare.terminate()
            service.terminate()


async def measure(
    stub: pb_grpc.CreditsServiceStub, bare_charge: grpc.aio.UnaryUnaryMultiCallable, pool: asyncpg.Pool,
    args: argparse.Namespace,
) -> list[Figure]:
    accounts = [f"bench-{n}" for n in range(args.accounts)]
    await fund(stub, accounts)
    request_numbers = itertools.count()

    def spread() -> str:
        return accounts[next(request_numbers) % len(accounts)]

    def hot() -> str:
        return accounts[0]

    def through_service(pick: Callable[[], str]) -> Callable[[], object]:
        async def charge() -> None:
            request = pb.ChargeRequest(user_id=pick(), amount=1, reference="bench",
                                       request_id=f"svc-{next(request_numbers)}")
            await stub.Charge(request, metadata=AS_IMAGE)

        return charge

    def through_bare_server(pick: Callable[[], str]) -> Callable[[], object]:
        async def charge() -> None:
            request = pb.ChargeRequest(user_id=pick(), amount=1, reference="bench",
                                       request_id=f"bare-{next(request_numbers)}")
            await bare_charge(request, metadata=AS_IMAGE)

        return charge

    def raw(pick: Callable[[], str]) -> Callable[[], object]:
        async def debit() -> None:
            user_id = pick()
            async with pool.acquire() as conn, conn.transaction():
                balance = await conn.fetchval(_RAW_DEBIT, user_id, 1)
                if balance is not None:
                    await conn.execute(_RAW_ENTRY, user_id, 1, balance, f"raw-{next(request_numbers)}")

        return debit

    seconds, rounds = args.seconds, args.rounds
    concurrency, hot_callers = args.credits_concurrency, args.hot_callers
    await calls_per_second(through_service(spread), 1.0, concurrency)  # warm-up: connections, plans, caches
    await calls_per_second(raw(spread), 1.0, concurrency)
    await calls_per_second(through_bare_server(spread), 1.0, concurrency)

    rates = await alternating_rates(
        {
            "raw": lambda: calls_per_second(raw(spread), seconds, concurrency),
            "service": lambda: calls_per_second(through_service(spread), seconds, concurrency),
            "bare": lambda: calls_per_second(through_bare_server(spread), seconds, concurrency),
        },
        rounds,
    )
    versus_raw = paired(rates["service"], rates["raw"])
    ceiling = paired(rates["bare"], rates["raw"])
    versus_bare = paired(rates["service"], rates["bare"])
    hot_row = await paired_rates(
        lambda: calls_per_second(through_service(hot), seconds, hot_callers),
        lambda: calls_per_second(through_service(spread), seconds, hot_callers),
        rounds,
    )
    raw_hot_row = await paired_rates(
        lambda: calls_per_second(raw(hot), seconds, hot_callers),
        lambda: calls_per_second(raw(spread), seconds, hot_callers),
        rounds,
    )
    return [
        ratio_figure("credits.charge", versus_raw.value, versus_raw.baseline, "calls/s", aim=CHARGE_AIM,
                     baseline_is="raw asyncpg debit transaction (conditional UPDATE + ledger INSERT), same client",
                     concurrency=concurrency, accounts=len(accounts), ratio_per_round=versus_raw.ratios),
        ratio_figure("credits.bare_debit_server", ceiling.value, ceiling.baseline, "calls/s",
                     baseline_is="raw asyncpg debit transaction, same client: the ceiling for grpc.aio here",
                     concurrency=concurrency, ratio_per_round=ceiling.ratios),
        ratio_figure("credits.charge_vs_bare_debit_server", versus_bare.value, versus_bare.baseline, "calls/s",
                     baseline_is="bare grpc.aio server running the same debit as one statement",
                     concurrency=concurrency, ratio_per_round=versus_bare.ratios),
        ratio_figure("credits.charge_hot_row", hot_row.value, hot_row.baseline, "calls/s",
                     baseline_is=f"Charge by {hot_callers} callers on {len(accounts)} accounts",
                     callers=hot_callers, ratio_per_round=hot_row.ratios),
        ratio_figure("credits.raw_debit_hot_row", raw_hot_row.value, raw_hot_row.baseline, "transactions/s",
                     baseline_is=f"the raw debit by {hot_callers} callers on {len(accounts)} accounts",
                     callers=hot_callers, ratio_per_round=raw_hot_row.ratios),
    ]


async def fund(stub: pb_grpc.CreditsServiceStub, accounts: list[str]) -> None:
    """Opens every account through the service and gives it more than any run can spend."""
    gate = asyncio.Semaphore(32)

    async def grant(user_id: str) -> None:
        async with gate:
            request = pb.GrantRequest(user_id=user_id, amount=FUNDING, reason="bench", request_id=f"fund-{user_id}")
            await stub.Grant(request, metadata=AS_ADMIN)

    await asyncio.gather(*(grant(user_id) for user_id in accounts))

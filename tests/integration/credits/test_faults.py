"""Real faults against a real credits process: kill -9 mid-burst, PostgreSQL cut mid-burst."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.grpc_errors import details_of

from .helpers import (
    CreditsUnderTest,
    assert_ledger_holds,
    count_rows,
    credits_client,
    postgres_proxy,
    service_env,
    through_proxy,
)

USERS = ("ann", "ben", "cat", "dan")
WORKERS = 8
UNLIMITED = {"CHARGE_RATE_PER_SECOND": "1000000", "CHARGE_BURST": "1000000"}


@dataclass
class Burst:
    """Every request a burst sent, and the answers its callers were given."""

    sent: dict[str, pb.ChargeRequest | pb.RefundRequest] = field(default_factory=dict)
    answers: dict[str, pb.ChargeResponse | pb.RefundResponse] = field(default_factory=dict)
    failures: dict[str, grpc.StatusCode] = field(default_factory=dict)

    async def send(self, credits: CreditsUnderTest, request_id: str, request) -> None:
        self.sent[request_id] = request
        method = "Charge" if isinstance(request, pb.ChargeRequest) else "Refund"
        try:
            self.answers[request_id] = await credits.call(method, request, "image")
        except grpc.aio.AioRpcError as error:
            self.failures[request_id] = details_of(error).code


async def run_burst(credits: CreditsUnderTest, burst: Burst, stop: asyncio.Event) -> None:
    """WORKERS callers charging in turn, each refunding half of every third charge it got."""

    async def caller(worker: int) -> None:
        n = 0
        while not stop.is_set():
            request_id = f"w{worker}-{n}"
            user = USERS[(worker + n) % len(USERS)]
            await burst.send(credits, request_id, pb.ChargeRequest(user_id=user, amount=10 + n % 7,
                                                                   reference=f"job:{request_id}",
                                                                   request_id=request_id))
            answer = burst.answers.get(request_id)
            if answer is not None and n % 3 == 0:
                refund = pb.RefundRequest(charge_id=answer.charge_id, amount=(10 + n % 7) // 2, reason="failed",
                                          request_id=f"refund-{request_id}")
                await burst.send(credits, f"refund-{request_id}", refund)
            n += 1

    await asyncio.gather(*(caller(worker) for worker in range(WORKERS)))


async def wait_for(condition, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def replay_all(credits: CreditsUnderTest, burst: Burst) -> dict[str, object]:
    replayed = Burst()
    for request_id, request in burst.sent.items():
        await replayed.send(credits, request_id, request)
    assert not replayed.failures, f"replays failed: {replayed.failures}"
    return replayed.answers


async def assert_each_happened_once(db, burst: Burst) -> None:
    """After the replays every request of the burst has exactly one ledger entry."""
    counts = await db.fetch(
        "SELECT request_id, count(*) AS entries FROM credits.ledger_entries WHERE request_id = ANY($1::text[])"
        " GROUP BY request_id",
        list(burst.sent),
    )
    assert {row["request_id"]: row["entries"] for row in counts} == dict.fromkeys(burst.sent, 1)


async def assert_acknowledged_in_ledger(db, burst: Burst) -> None:
    for request_id, answer in burst.answers.items():
        entry_id = answer.charge_id if isinstance(answer, pb.ChargeResponse) else answer.refund_id
        row = await db.fetchrow("SELECT request_id, balance_after FROM credits.ledger_entries WHERE entry_id = $1::uuid",
                                entry_id)
        assert row is not None, f"{request_id} was acknowledged but is not in the ledger"
        assert (row["request_id"], row["balance_after"]) == (request_id, answer.balance)


async def started(start_service, env: dict[str, str]):
    process = start_service("credits", env)
    await process.wait_healthy(env["CREDITS_ADDR"])
    return process


async def fund_users(credits: CreditsUnderTest) -> None:
    for user in USERS:
        await credits.grant(user, 1_000_000, f"fund-{user}")


async def test_kill_9_during_a_burst_loses_no_acknowledged_charge(start_service, database_url, auth_tokens, db):
    env = service_env(database_url, auth_tokens, **UNLIMITED)
    addr = env["CREDITS_ADDR"]
    process = await started(start_service, env)
    burst, stop = Burst(), asyncio.Event()

    async with credits_client(addr, auth_tokens) as credits:
        await fund_users(credits)
        running = asyncio.create_task(run_burst(credits, burst, stop))
        await wait_for(lambda: len(burst.answers) >= 150)
        process.kill()
        await wait_for(lambda: len(burst.failures) >= 1)
        stop.set()
        await running

    await started(start_service, env)
    async with credits_client(addr, auth_tokens) as credits:
        await assert_ledger_holds(database_url)
        await assert_acknowledged_in_ledger(db, burst)
        first_replay = await replay_all(credits, burst)
        await assert_each_happened_once(db, burst)
        rows, balances = await count_rows(db), [(await credits.account(user)).balance for user in USERS]
        second_replay = await replay_all(credits, burst)

        assert {request_id: first_replay[request_id] for request_id in burst.answers} == burst.answers
        assert second_replay == first_replay
        assert await count_rows(db) == rows
        assert [(await credits.account(user)).balance for user in USERS] == balances
    assert set(burst.failures.values()) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def test_postgres_cut_during_a_burst_is_unavailable_never_internal_and_recovers(
    start_service, database_url, auth_tokens, db
):
    async with postgres_proxy(database_url) as proxy:
        env = service_env(through_proxy(database_url, proxy), auth_tokens, **UNLIMITED)
        process = await started(start_service, env)
        burst, stop = Burst(), asyncio.Event()
        async with credits_client(env["CREDITS_ADDR"], auth_tokens) as credits:
            await fund_users(credits)
            running = asyncio.create_task(run_burst(credits, burst, stop))
            await wait_for(lambda: len(burst.answers) >= 100)
            await proxy.cut()
            await wait_for(lambda: len(burst.failures) >= 3 * WORKERS)
            await proxy.restore()
            answered_before_restore = len(burst.answers)
            await wait_for(lambda: len(burst.answers) >= answered_before_restore + 100)
            stop.set()
            await running

            assert process.is_running(), "recovering must not need a restart"
            assert set(burst.failures.values()) == {grpc.StatusCode.UNAVAILABLE}
            await assert_acknowledged_in_ledger(db, burst)
            # A caller told UNAVAILABLE retries with the same request_id: the request then
            # happens once, whether or not it had committed before the cut.
            await replay_all(credits, burst)
            await assert_each_happened_once(db, burst)
            rows = await count_rows(db)
            await replay_all(credits, burst)
            assert await count_rows(db) == rows
    await assert_ledger_holds(database_url)


@pytest.mark.parametrize("method", ["GetAccount", "Grant", "ListLedgerEntries"])
async def test_other_methods_are_unavailable_while_postgres_is_cut(start_service, database_url, auth_tokens, method):
    requests = {
        "GetAccount": pb.GetAccountRequest(user_id="u"),
        "Grant": pb.GrantRequest(user_id="u", amount=5, reason="r", request_id="g-1"),
        "ListLedgerEntries": pb.ListLedgerEntriesRequest(user_id="u"),
    }
    async with postgres_proxy(database_url) as proxy:
        env = service_env(through_proxy(database_url, proxy), auth_tokens)
        await started(start_service, env)
        async with credits_client(env["CREDITS_ADDR"], auth_tokens) as credits:
            await proxy.cut()
            details = await credits.refused(method, requests[method])
            await proxy.restore()
            await credits.call(method, requests[method])

    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")


async def test_an_account_row_held_elsewhere_fails_its_own_calls_quickly_and_spares_the_others(credits, db, database_url):
    balances = {}
    for user in ("held", "free"):
        granted = await credits.call("Grant", pb.GrantRequest(user_id=user, amount=1000, reason="seed", request_id=f"seed-{user}"))
        balances[user] = granted.account.balance
    entries_before = await db.fetchval("SELECT count(*) FROM credits.ledger_entries")
    holder = await asyncpg.connect(database_url)
    try:
        # An operator's open transaction (or another replica's long one) on one account.
        holder_tx = holder.transaction()
        await holder_tx.start()
        await holder.execute("SELECT 1 FROM credits.accounts WHERE user_id = 'held' FOR UPDATE")
        started = asyncio.get_running_loop().time()

        async def charge(user: str, n: int):
            return await credits.call("Charge", pb.ChargeRequest(user_id=user, amount=1, reference="job:x",
                                                                 request_id=f"{user}-{n}"), "image")  # fmt: skip

        # More calls on the held account than the pool has connections.
        held_calls = [asyncio.create_task(charge("held", n)) for n in range(14)]
        await asyncio.sleep(0.2)
        free_answers = [await charge("free", n) for n in range(3)]
        account = await credits.call("GetAccount", pb.GetAccountRequest(user_id="free"), "image")
        spared_within = asyncio.get_running_loop().time() - started
        outcomes = await asyncio.gather(*held_calls, return_exceptions=True)
        failed_within = asyncio.get_running_loop().time() - started
    finally:
        await holder_tx.rollback()
        await holder.close()

    free = balances["free"]
    assert [answer.balance for answer in free_answers] == [free - 1, free - 2, free - 3]
    assert account.account.balance == free - 3
    assert all(isinstance(outcome, grpc.aio.AioRpcError) for outcome in outcomes)
    assert {details_of(outcome).reason for outcome in outcomes} == {"DATABASE_UNAVAILABLE"}
    # Each waited a lock_timeout or two, not the pool's 10 s acquire bound that every other
    # caller used to wait out behind them.
    assert spared_within < 9 and failed_within < 9.5
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries") == entries_before + 3
    # Once the row is free the same requests go through.
    assert (await charge("held", 0)).balance == balances["held"] - 1

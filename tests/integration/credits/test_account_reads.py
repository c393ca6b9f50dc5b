"""Concurrent GetAccount reads share one statement (domain.Accounts over shared/coalescing.py),
and each call still gets its own account as committed before it asked: on a real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg

from services.credits import domain


class CountedAccounts(domain.Accounts):
    """The credits service's account reads, recording the users each statement was sent for."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.batches: list[list[str]] = []

    async def _fetch_many(self, user_ids):
        self.batches.append(sorted(user_ids))
        return await super()._fetch_many(user_ids)


async def test_concurrent_reads_of_different_users_share_one_statement(pool):
    users = [f"reader-{n}" for n in range(8)]
    for n, user in enumerate(users):
        await grant(pool, user, 1 + n)  # on top of the welcome grant's 1000
    accounts = CountedAccounts(pool)

    read = await asyncio.gather(*(accounts.get(user) for user in users))

    assert accounts.batches == [users]
    assert [(account.user_id, account.balance) for account in read] == [(user, 1001 + n) for n, user in enumerate(users)]


async def test_callers_of_one_user_share_the_read_and_a_new_user_is_still_opened(pool, db):
    accounts = CountedAccounts(pool)

    read = await asyncio.gather(*(accounts.get("newcomer") for _ in range(5)), accounts.get("newcomer-2"))

    # The first read finds neither; each call opens its account (one insert wins the race).
    assert accounts.batches[0] == ["newcomer", "newcomer-2"]
    assert {(account.user_id, account.balance) for account in read} == {("newcomer", 1000), ("newcomer-2", 1000)}
    grants = await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE user_id LIKE 'newcomer%'")
    assert grants == 2


async def test_a_read_sees_what_was_committed_before_it_asked(pool):
    accounts = CountedAccounts(pool)
    assert (await accounts.get("watcher")).balance == 1000
    await grant(pool, "watcher", 7)

    assert (await accounts.get("watcher")).balance == 1007


async def grant(pool: asyncpg.Pool, user_id: str, amount: int) -> None:
    await domain.grant(pool, user_id=user_id, amount=amount, reason="test", request_id=f"grant-{user_id}-{amount}")

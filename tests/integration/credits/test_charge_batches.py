"""Concurrent charges share one statement (domain.Charges over shared/coalescing.py), and each
call still gets exactly the answer it would have got alone: on a real PostgreSQL, with the
ledger audit of conftest.py after every test."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import asyncpg

from services.credits import domain, storage

# No test here is about the rate limit.
UNLIMITED = domain.ChargeRateLimit(per_second=Decimal(1000), burst=1000)


class CountedCharges(domain.Charges):
    """The credits service's charges, recording the calls each batch was sent with."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool, UNLIMITED)
        self.batch_sizes: list[int] = []

    async def _charge_batch(self, calls):
        self.batch_sizes.append(len(calls))
        return await super()._charge_batch(calls)


async def opened(pool: asyncpg.Pool, *user_ids: str) -> None:
    for user_id in user_ids:
        await domain.Accounts(pool).get(user_id)  # 10 credits of welcome grant each


def fields_of(error: domain.InvalidRequest) -> list[str]:
    return [name for name, _ in error.violations]


def charge(charges: domain.Charges, user_id: str, amount: int, request_id: str):
    return domain.charge(charges, user_id=user_id, amount=amount, reference="job:1", request_id=request_id)


async def test_concurrent_charges_of_different_users_share_one_statement(pool, db):
    users = [f"u-{n}" for n in range(8)]
    await opened(pool, *users)
    charges = CountedCharges(pool)

    answers = await asyncio.gather(*(charge(charges, user, 100 + n, f"c-{n}") for n, user in enumerate(users)))

    assert charges.batch_sizes == [8]
    assert [answer.value.balance for answer in answers] == [1000 - 100 - n for n in range(8)]
    assert not any(answer.replayed for answer in answers)
    entries = await db.fetch(
        "SELECT user_id, amount, balance_after, entry_id::text AS charge_id FROM credits.ledger_entries"
        " WHERE kind = 'CHARGE' ORDER BY user_id"
    )
    assert [(e["user_id"], e["amount"], e["balance_after"]) for e in entries] == [
        (user, -(100 + n), 900 - n) for n, user in enumerate(users)
    ]
    assert {e["charge_id"] for e in entries} == {answer.value.charge_id for answer in answers}


async def test_one_users_concurrent_charges_each_see_the_balance_before_them(pool, db):
    await opened(pool, "hot")
    charges = CountedCharges(pool)

    answers = await asyncio.gather(*(charge(charges, "hot", 100, f"hot-{n}") for n in range(6)))

    assert sorted(answer.value.balance for answer in answers) == [400, 500, 600, 700, 800, 900]
    assert len({answer.value.charge_id for answer in answers}) == 6
    # One went in a batch; the rest charged alone at once instead of waiting for it.
    assert charges.batch_sizes == [1]
    assert await db.fetchval("SELECT balance FROM credits.accounts WHERE user_id = 'hot'") == 400


async def test_twin_calls_charge_once_and_the_twin_is_a_replay(pool, db):
    await opened(pool, "u")
    charges = CountedCharges(pool)

    first, twin = await asyncio.gather(charge(charges, "u", 300, "same"), charge(charges, "u", 300, "same"))

    assert charges.batch_sizes == [1]  # the twin went alone and met the first one's record
    assert first.value == twin.value and first.value.balance == 700
    assert sorted([first.replayed, twin.replayed]) == [False, True]
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'CHARGE'") == 1


async def test_each_call_of_a_batch_gets_its_own_refusal_or_charge(pool, db):
    await opened(pool, "rich", "poor", "mixed-up")
    await charge(domain.Charges(pool, UNLIMITED), "rich", 1, "taken-key")
    charges = CountedCharges(pool)

    outcomes = await asyncio.gather(
        charge(charges, "rich", 500, "ok"),
        charge(charges, "poor", 5000, "too-much"),
        charge(charges, "mixed-up", 1, "taken-key"),  # another user's charge has this key
        charge(charges, "new-user", 200, "first-sight"),  # no account yet
        return_exceptions=True,
    )

    assert charges.batch_sizes[0] == 4
    ok, too_much, mixed_up, first_sight = outcomes
    assert ok.value.balance == 499 and not ok.replayed
    assert isinstance(too_much, domain.InsufficientCredits)
    assert isinstance(mixed_up, domain.RequestIdReused) and fields_of(mixed_up) == ["request_id"]
    assert first_sight.value.balance == 800
    balances = dict(await db.fetch("SELECT user_id, balance FROM credits.accounts"))
    assert balances == {"rich": 499, "poor": 1000, "mixed-up": 1000, "new-user": 800}


async def test_a_batch_whose_statement_fails_leaves_each_call_to_charge_alone(pool, db, database_url, caplog):
    """A twin of one call commits while the batch runs: PostgreSQL fails the whole statement on
    the unique key, and every other call of the batch is still charged exactly once."""
    caplog.set_level(logging.INFO, logger=domain.__name__)
    await opened(pool, "a", "b", "c", "rival")
    racer = await asyncpg.connect(database_url)
    try:
        # The rival's charge with key "k-b" is made but not committed: the batch's insert of
        # b's record with that key waits for it, then fails once it commits.
        racing = racer.transaction()
        await racing.start()
        await storage.charge(
            racer, user_id="rival", request_id="k-b", amount=1, reference="job:1",
            parameters={"amount": 1, "reference": "job:1"}, burst=1000, rate_per_second=Decimal(1000),
        )
        charges = CountedCharges(pool)
        calls = asyncio.gather(
            *(charge(charges, user, 100, f"k-{user}") for user in ("a", "b", "c")), return_exceptions=True
        )
        await asyncio.sleep(0.3)
        assert charges.batch_sizes == [3]  # out, and waiting on the rival's row
        await racing.commit()
        a, b, c = await calls
    finally:
        await racer.close()

    failed = [record for record in caplog.records if record.msg == "credits.charge_batch_failed"]
    assert len(failed) == 3 and all("UniqueViolationError" in record.error for record in failed)
    assert (a.value.balance, c.value.balance) == (900, 900)
    assert isinstance(b, domain.RequestIdReused) and fields_of(b) == ["request_id"]
    balances = dict(await db.fetch("SELECT user_id, balance FROM credits.accounts"))
    assert balances == {"a": 900, "b": 1000, "c": 900, "rival": 999}
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'CHARGE'") == 3


async def test_an_account_locked_elsewhere_holds_up_only_its_own_charge(pool, db, database_url):
    await opened(pool, "busy", "x", "y")
    locker = await asyncpg.connect(database_url)
    try:
        # A transaction elsewhere (a long grant, say) holds the busy account's row.
        holding = locker.transaction()
        await holding.start()
        await locker.execute("SELECT FROM credits.accounts WHERE user_id = 'busy' FOR UPDATE")
        charges = CountedCharges(pool)
        stuck = asyncio.ensure_future(charge(charges, "busy", 100, "k-busy"))
        await asyncio.sleep(0.2)
        others = await asyncio.wait_for(
            asyncio.gather(charge(charges, "x", 100, "k-x"), charge(charges, "y", 100, "k-y")), timeout=5
        )
        assert [other.value.balance for other in others] == [900, 900] and not stuck.done()
        await holding.rollback()
        assert (await asyncio.wait_for(stuck, timeout=5)).value.balance == 900
    finally:
        await locker.close()

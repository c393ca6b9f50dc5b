"""Fixtures of the credits tests: the service, a database connection, and the ledger audit
that runs after every test here, whatever the test itself asserted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.db import create_pool

from .helpers import CreditsUnderTest, assert_ledger_holds, serve_credits


@pytest.fixture(autouse=True)
async def ledger_holds_after_the_test(database_url: str) -> AsyncIterator[None]:
    """Every account's balance is its ledger's sum (and the other rules of helpers.py)."""
    yield
    await assert_ledger_holds(database_url)


@pytest.fixture
async def credits(database_url: str, auth_tokens: dict[str, str]) -> AsyncIterator[CreditsUnderTest]:
    # A bucket no ordinary test empties; the rate-limit tests set their own.
    async with serve_credits(database_url, auth_tokens, CHARGE_RATE_PER_SECOND="1000", CHARGE_BURST="1000") as service:
        yield service


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def pool(credits: CreditsUnderTest, database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool for the tests that call the domain directly, on the database `credits`
    migrated, made as the service makes its own (no reset query on release)."""
    pool = await create_pool(database_url, max_size=4, application_name="test-credits-domain", reset_session_state=False)
    yield pool
    await pool.close()

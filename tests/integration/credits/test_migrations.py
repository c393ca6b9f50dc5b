"""The credits migrations on a database that already holds accounts from the first one."""

from __future__ import annotations

import asyncio
import shutil
import uuid

import asyncpg
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from services.credits.main import LOCK_TIMEOUT_SECONDS, MIGRATIONS_DIR
from shared.migrations import apply_migrations
from tools.infra import create_database, drop_database, dsn_with_database

from .helpers import assert_ledger_holds, serve_credits


@pytest.fixture
async def empty_database(postgres_admin_dsn):
    name = f"credits_migration_{uuid.uuid4().hex[:12]}"
    await create_database(postgres_admin_dsn, name)
    yield dsn_with_database(postgres_admin_dsn, name)
    await drop_database(postgres_admin_dsn, name)


async def test_accounts_opened_before_0002_keep_their_ledger_and_their_welcome_key(empty_database, tmp_path,
                                                                                   auth_tokens):
    only_first = tmp_path / "first"
    only_first.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_accounts_and_ledger.sql", only_first)
    conn = await asyncpg.connect(empty_database)
    try:
        await apply_migrations(conn, "credits", only_first)
        # What the service on main wrote when it opened an account.
        await conn.execute("INSERT INTO credits.accounts (user_id, plan, balance) VALUES ('old', 'FREE', 1000)")
        await conn.execute(
            "INSERT INTO credits.ledger_entries (user_id, kind, amount, balance_after, reference, request_id)"
            " VALUES ('old', 'GRANT', 1000, 1000, 'welcome grant', 'welcome:old')"
        )
        applied = await apply_migrations(conn, "credits", MIGRATIONS_DIR)
        again = await apply_migrations(conn, "credits", MIGRATIONS_DIR)
        welcome = await conn.fetchrow("SELECT operation, outcome FROM credits.requests WHERE user_id = 'old'")
    finally:
        await conn.close()

    assert applied == ["0002"] and again == []
    assert tuple(welcome) == ("WELCOME_GRANT", "DONE")
    async with serve_credits(empty_database, auth_tokens) as credits:
        charged = await credits.charge("old", 250, "after-upgrade")
        reused = await credits.refused(
            "Charge", pb.ChargeRequest(user_id="old", amount=1, reference="r", request_id="welcome:old"), "image"
        )
    assert charged.balance == 750
    assert reused.reason == "REQUEST_ID_REUSED"
    await assert_ledger_holds(empty_database)



async def test_start_up_waits_out_another_process_migrating_longer_than_the_lock_timeout(empty_database, auth_tokens):
    other = await asyncpg.connect(empty_database)
    try:
        # Another credits process holding the migrations' lock (as it would while migrating).
        await other.execute("SELECT pg_advisory_lock(hashtext('casefile.migrations.' || 'credits'))")

        async def release_later() -> None:
            await asyncio.sleep(LOCK_TIMEOUT_SECONDS + 1)
            await other.execute("SELECT pg_advisory_unlock(hashtext('casefile.migrations.' || 'credits'))")

        releasing = asyncio.create_task(release_later())
        async with serve_credits(empty_database, auth_tokens) as credits:
            account = await credits.account("u-after-wait")
        await releasing
    finally:
        await other.close()

    assert account.balance == 1000

import os
import uuid

import asyncpg
import pytest

from shared.db import DatabaseUnreachable, create_pool, database_name, drop_database, ensure_database, with_database

# The PostgreSQL server the tests may create throwaway databases on.
SERVER_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
async def throwaway_dsn():
    dsn = with_database(SERVER_DSN, f"test_shared_{uuid.uuid4().hex}")
    yield dsn
    await drop_database(dsn)


def test_database_name_and_with_database():
    dsn = "postgresql://u:p@h:5432/casefile?sslmode=disable"
    assert database_name(dsn) == "casefile"
    other = with_database(dsn, "casefile_test")
    assert other == "postgresql://u:p@h:5432/casefile_test?sslmode=disable"
    assert database_name(other) == "casefile_test"
    assert database_name("postgresql://u@h/?dbname=x") == "x"
    assert database_name(with_database("postgresql://u@h/?dbname=x", "y")) == "y"
    with pytest.raises(ValueError):
        database_name("postgresql://u@h")


async def test_ensure_database_creates_once(throwaway_dsn):
    assert await ensure_database(throwaway_dsn) is True
    assert await ensure_database(throwaway_dsn) is False
    conn = await asyncpg.connect(throwaway_dsn)
    try:
        assert await conn.fetchval("SELECT current_database()") == database_name(throwaway_dsn)
    finally:
        await conn.close()


async def test_drop_database_removes_it_even_with_open_sessions(throwaway_dsn):
    await ensure_database(throwaway_dsn)
    lingering = await asyncpg.connect(throwaway_dsn)
    await drop_database(throwaway_dsn)
    assert not await _exists(throwaway_dsn)
    lingering.terminate()


async def _exists(dsn: str) -> bool:
    conn = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        return bool(
            await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database_name(dsn))
        )
    finally:
        await conn.close()


async def test_create_pool_sets_application_name(throwaway_dsn):
    await ensure_database(throwaway_dsn)
    pool = await create_pool(throwaway_dsn, max_size=2, application_name="casefile-test")
    try:
        assert await pool.fetchval("SHOW application_name") == "casefile-test"
        assert pool.get_max_size() == 2
    finally:
        await pool.close()


async def test_a_pool_that_keeps_session_state_still_rolls_back_open_transactions(throwaway_dsn):
    await ensure_database(throwaway_dsn)
    pool = await create_pool(throwaway_dsn, max_size=1, application_name="casefile-test", reset_session_state=False)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET statement_timeout = 1234")
            await conn.execute("CREATE TABLE t (n int)")
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO t VALUES (1)")
        async with pool.acquire() as conn:
            kept = await conn.fetchval("SHOW statement_timeout")
            rows = await conn.fetchval("SELECT count(*) FROM t")
            in_transaction = conn.is_in_transaction()
    finally:
        await pool.close()

    assert kept == "1234ms"  # no RESET ALL: what a caller SETs stays with the connection
    assert (rows, in_transaction) == (0, False)


def _nobody_listens() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_unreachable_server_is_a_clear_database_url_error_after_the_timeout():
    dsn = f"postgresql://postgres:s3cret@127.0.0.1:{_nobody_listens()}/casefile"

    with pytest.raises(DatabaseUnreachable) as raised:
        await create_pool(dsn, application_name="test", connect_timeout=1.0)

    message = str(raised.value)
    assert message.startswith("DATABASE_URL: cannot connect to 127.0.0.1:")
    assert "/casefile" in message
    assert "s3cret" not in message


async def test_missing_database_fails_at_once_without_retrying():
    dsn = with_database(SERVER_DSN, f"missing_{uuid.uuid4().hex}")

    with pytest.raises(DatabaseUnreachable) as raised:
        await create_pool(dsn, application_name="test", connect_timeout=30.0)

    assert "does not exist" in str(raised.value)

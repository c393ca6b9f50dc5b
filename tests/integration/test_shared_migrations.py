import asyncio
import os
import pathlib
import uuid

import asyncpg
import pytest

from shared.db import drop_database, ensure_database, with_database
from shared.migrations import MigrationError, apply_migrations

SERVER_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

FIRST = """
CREATE TABLE demo.items (id bigint PRIMARY KEY, label text NOT NULL);
CREATE TABLE demo.applied_log (file text NOT NULL);
INSERT INTO demo.applied_log VALUES ('0001');
SELECT pg_sleep(0.2);  -- widens the window in which concurrent appliers would collide
"""
SECOND = """
ALTER TABLE demo.items ADD COLUMN price_cents bigint NOT NULL DEFAULT 0;
CREATE INDEX items_label_idx ON demo.items (label);
INSERT INTO demo.applied_log VALUES ('0002');
"""


@pytest.fixture
async def dsn():
    dsn = with_database(SERVER_DSN, f"test_migrations_{uuid.uuid4().hex}")
    await ensure_database(dsn)
    yield dsn
    await drop_database(dsn)


@pytest.fixture
async def conn(dsn):
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
def migrations_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "0001_create_items.sql").write_text(FIRST)
    (tmp_path / "0002_add_price.sql").write_text(SECOND)
    (tmp_path / "README.md").write_text("not a migration")
    return tmp_path


async def catalog(conn: asyncpg.Connection) -> list:
    """Everything about the demo schema that a second run must leave untouched."""
    columns = await conn.fetch(
        "SELECT table_name, column_name, data_type, column_default FROM information_schema.columns"
        " WHERE table_schema = 'demo' ORDER BY 1, 2"
    )
    indexes = await conn.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'demo' ORDER BY 1"
    )
    bookkeeping = await conn.fetch("SELECT * FROM demo.schema_migrations ORDER BY version")
    log = await conn.fetch("SELECT file FROM demo.applied_log ORDER BY file")
    return [list(map(tuple, rows)) for rows in (columns, indexes, bookkeeping, log)]


async def test_applies_in_order_then_changes_nothing(conn, migrations_dir):
    assert await apply_migrations(conn, "demo", migrations_dir) == ["0001", "0002"]
    before = await catalog(conn)
    assert await apply_migrations(conn, "demo", migrations_dir) == []
    assert await catalog(conn) == before
    rows = await conn.fetch("SELECT version, name FROM demo.schema_migrations ORDER BY version")
    assert [tuple(r) for r in rows] == [("0001", "create_items"), ("0002", "add_price")]


async def test_new_file_applied_later(conn, migrations_dir):
    await apply_migrations(conn, "demo", migrations_dir)
    (migrations_dir / "0003_more.sql").write_text("ALTER TABLE demo.items ADD COLUMN note text;")
    assert await apply_migrations(conn, "demo", migrations_dir) == ["0003"]


async def test_concurrent_appliers_apply_each_file_once(dsn, migrations_dir):
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *(apply_migrations(c, "demo", migrations_dir) for c in conns)
        )
        assert sorted(results) == [[], [], ["0001", "0002"]]
        assert [r["file"] for r in await conns[0].fetch("SELECT file FROM demo.applied_log")] == [
            "0001",
            "0002",
        ]
    finally:
        for c in conns:
            await c.close()


async def test_failing_file_rolls_back_only_itself(dsn, conn, migrations_dir):
    (migrations_dir / "0003_broken.sql").write_text(
        "CREATE TABLE demo.half_done (id int);\nSELECT * FROM demo.no_such_table;"
    )
    with pytest.raises(MigrationError, match=r"^0003_broken\.sql: .*no_such_table"):
        await apply_migrations(conn, "demo", migrations_dir)
    versions = await conn.fetch("SELECT version FROM demo.schema_migrations ORDER BY version")
    assert [r["version"] for r in versions] == ["0001", "0002"]
    assert await conn.fetchval("SELECT to_regclass('demo.half_done')") is None
    # The lock was released: another session can take it at once.
    other = await asyncpg.connect(dsn)
    try:
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock(hashtext('casefile.migrations.' || 'demo'))"
        )
    finally:
        await other.close()


async def test_edited_file_is_detected(conn, migrations_dir):
    await apply_migrations(conn, "demo", migrations_dir)
    (migrations_dir / "0001_create_items.sql").write_text(FIRST + "\n-- a quiet edit\n")
    edited = r"^0001_create_items\.sql: changed after it was applied"
    with pytest.raises(MigrationError, match=edited):
        await apply_migrations(conn, "demo", migrations_dir)


async def test_misnamed_and_duplicate_files_are_rejected(conn, tmp_path):
    (tmp_path / "1_first.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"^1_first\.sql: migration files must be named"):
        await apply_migrations(conn, "demo", tmp_path)
    (tmp_path / "1_first.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"^0001_b\.sql: version 0001 is also 0001_a\.sql"):
        await apply_migrations(conn, "demo", tmp_path)


async def test_refuses_a_connection_inside_a_transaction(conn, migrations_dir):
    async with conn.transaction():
        with pytest.raises(MigrationError, match="outside a transaction"):
            await apply_migrations(conn, "demo", migrations_dir)

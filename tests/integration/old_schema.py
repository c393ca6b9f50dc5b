"""A database whose schema is only as far as older code migrated it, for tests of old rows."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterable, Iterator

import asyncpg

from shared.migrations import apply_migrations
from tests.conftest import run_async, unique_name
from tools.infra import create_database, drop_database, dsn_with_database


@contextlib.contextmanager
def database_migrated_up_to(
    admin_dsn: str, tmp_path: pathlib.Path, schema: str, migrations: pathlib.Path, files: Iterable[str]
) -> Iterator[str]:
    """A new database with only `files` of `migrations` applied to `schema`; its DSN, dropped after."""
    name = unique_name(f"casefile_old_{schema}")
    run_async(create_database(admin_dsn, name))
    old = tmp_path / f"migrations_{schema}"
    old.mkdir()
    for file in files:
        shutil.copy(migrations / file, old / file)
    dsn = dsn_with_database(admin_dsn, name)

    async def migrate() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn, schema, old)
        finally:
            await conn.close()

    try:
        run_async(migrate())
        yield dsn
    finally:
        run_async(drop_database(admin_dsn, name))

"""Numbered SQL migrations, applied once each, in order, under an advisory lock.

Each service keeps `migrations/NNNN_<what>.sql` and records what ran in
`<schema>.schema_migrations`. A migration, once applied, is never edited: a changed
checksum stops start-up instead of silently diverging from what the database holds.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
import re
from dataclasses import dataclass

import asyncpg

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<what>[a-z0-9_]+)\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_LOCK_SQL = "SELECT pg_advisory_lock(hashtext('casefile.migrations.' || $1))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext('casefile.migrations.' || $1))"


class MigrationError(Exception):
    """A migration could not be applied, or an applied one was edited."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: pathlib.Path
    sql: str
    checksum: str


def load_migrations(directory: pathlib.Path) -> list[Migration]:
    """Every NNNN_<what>.sql in `directory`, in numeric order."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            # A misnamed file would otherwise be skipped without anyone noticing.
            raise MigrationError(f"{path.name}: migration files must be named NNNN_<what>.sql")
        content = path.read_bytes()
        migrations.append(
            Migration(
                version=match["version"],
                name=match["what"],
                path=path,
                sql=content.decode("utf-8"),
                checksum=hashlib.sha256(content).hexdigest(),
            )
        )
    _reject_duplicate_versions(migrations)
    return migrations


def _reject_duplicate_versions(migrations: list[Migration]) -> None:
    seen: dict[str, str] = {}
    for migration in migrations:
        if migration.version in seen:
            other = seen[migration.version]
            raise MigrationError(
                f"{migration.path.name}: version {migration.version} is also {other}"
            )
        seen[migration.version] = migration.path.name


async def apply_migrations(
    conn: asyncpg.Connection, schema: str, directory: pathlib.Path
) -> list[str]:
    """Apply the files not yet applied; returns their versions ([] when up to date)."""
    if not _SCHEMA_NAME.match(schema):
        raise MigrationError(f"{schema!r}: schema names are lowercase letters, digits and _")
    if conn.is_in_transaction():
        raise MigrationError("apply_migrations needs a connection outside a transaction")
    migrations = load_migrations(directory)
    # A session lock, not a transaction lock: it must span one transaction per file.
    await conn.execute(_LOCK_SQL, schema)
    try:
        await _create_bookkeeping(conn, schema)
        applied = await _applied_checksums(conn, schema)
        _reject_edited(migrations, applied)
        pending = [m for m in migrations if m.version not in applied]
        return await _apply_pending(conn, schema, pending)
    finally:
        if not conn.is_closed():
            await conn.execute(_UNLOCK_SQL, schema)


async def _create_bookkeeping(conn: asyncpg.Connection, schema: str) -> None:
    # Inside the lock: concurrent CREATE SCHEMA IF NOT EXISTS can still collide in PostgreSQL.
    await conn.execute(
        f"""
        CREATE SCHEMA IF NOT EXISTS {schema};
        CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
            version text PRIMARY KEY,
            name text NOT NULL,
            checksum text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )


async def _applied_checksums(conn: asyncpg.Connection, schema: str) -> dict[str, str]:
    rows = await conn.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


def _reject_edited(migrations: list[Migration], applied: dict[str, str]) -> None:
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"{migration.path.name}: changed after it was applied; "
                "add a new migration instead of editing this one"
            )


async def _apply_pending(
    conn: asyncpg.Connection, schema: str, pending: list[Migration]
) -> list[str]:
    applied_now = []
    for migration in pending:
        await _apply_one(conn, schema, migration)
        applied_now.append(migration.version)
    return applied_now


async def _apply_one(conn: asyncpg.Connection, schema: str, migration: Migration) -> None:
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, name, checksum)"
                " VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.PostgresError as error:
        log.error(
            "migrations.failed",
            extra={"schema": schema, "migration": migration.path.name, "error": str(error)},
        )
        raise MigrationError(f"{migration.path.name}: {error}") from error
    log.info("migrations.applied", extra={"schema": schema, "migration": migration.path.name})

"""asyncpg pools and the few DSN manipulations `make run` and the tests need."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

# The database every PostgreSQL server has, used to create the others.
_MAINTENANCE_DATABASE = "postgres"
_DATABASE_QUERY_KEYS = ("dbname", "database")


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, application_name: str
) -> asyncpg.Pool:
    """A pool whose connections show `application_name` in pg_stat_activity."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": application_name},
    )
    log.info(
        "db.pool_created",
        extra={"database": database_name(dsn), "min_size": min_size, "max_size": max_size},
    )
    return pool


async def close_pool(pool: asyncpg.Pool, timeout: float = 10.0) -> None:
    """Waits up to `timeout` for borrowed connections, then cuts them: shutdown must end."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        log.warning("db.pool_close_timed_out", extra={"timeout_seconds": timeout})
        pool.terminate()


def database_name(dsn: str) -> str:
    """The database a postgresql:// DSN names (path, or a dbname= query parameter)."""
    parts = urlsplit(dsn)
    name = unquote(parts.path.lstrip("/"))
    if not name:
        query = dict(parse_qsl(parts.query))
        name = next((query[key] for key in _DATABASE_QUERY_KEYS if query.get(key)), "")
    if not name:
        raise ValueError("the DSN names no database")
    return name


def with_database(dsn: str, name: str) -> str:
    """The same server, user and options, but database `name`."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in _DATABASE_QUERY_KEYS]
    return urlunsplit(
        (parts.scheme, parts.netloc, "/" + quote(name, safe=""), urlencode(query), parts.fragment)
    )


async def ensure_database(dsn: str) -> bool:
    """Create the DSN's database when missing; True when this call created it."""
    name = database_name(dsn)
    conn = await asyncpg.connect(with_database(dsn, _MAINTENANCE_DATABASE))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            # Another process won the race between our check and our CREATE.
            return False
    finally:
        await conn.close()
    log.info("db.database_created", extra={"database": name})
    return True


async def drop_database(dsn: str) -> None:
    """Drop the DSN's database if it exists, closing its sessions (tests' cleanup)."""
    conn = await asyncpg.connect(with_database(dsn, _MAINTENANCE_DATABASE))
    try:
        # FORCE ends connections a failed test left open, which would otherwise block the drop.
        name = _quote_ident(database_name(dsn))
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

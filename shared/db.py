"""asyncpg pools and the few DSN manipulations `make run` and the tests need."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from shared.config import ConfigError, Secret

log = logging.getLogger(__name__)

# The database every PostgreSQL server has, used to create the others.
_MAINTENANCE_DATABASE = "postgres"
_DATABASE_QUERY_KEYS = ("dbname", "database")


class DatabaseUnreachable(ConfigError):
    """DATABASE_URL names no database this process can use; the message says why."""

    def __init__(self, dsn: str, reason: str) -> None:
        host, port = _address(dsn)
        # Host, port and database only: the DSN may carry a password.
        super().__init__("DATABASE_URL", f"cannot connect to {host}:{port}/{database_name(dsn)}: {reason}")


# A server that is starting (or a port nobody answers yet) may come up in a moment;
# a wrong database name or password will not.
_TRANSIENT_CONNECT_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError)


# What a lost, refused or overloaded database raises: use cases report these as
# "unavailable, try again" rather than as a bug. OSError covers a refused or reset TCP
# connection, OperatorInterventionError a server shutting down or a cancelled statement,
# InsufficientResourcesError "too many connections" or a full disk, LockNotAvailableError a
# row held past a pool's lock_timeout by another transaction.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.InterfaceError,
)


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database is away (try again later), not a bug."""
    # asyncpg's client-side DataError (a badly typed argument: our bug) is an InterfaceError
    # too; it is also a ValueError, which no lost connection is.
    return isinstance(error, _UNAVAILABLE_ERRORS) and not isinstance(error, ValueError)


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """A pool reset that sends nothing (asyncpg still rolls back an open transaction)."""


async def create_pool(
    dsn: str | Secret[str],
    *,
    min_size: int = 1,
    max_size: int = 10,
    application_name: str,
    connect_timeout: float = 15.0,
    reset_session_state: bool = True,
    lock_timeout_seconds: float | None = None,
) -> asyncpg.Pool:
    """A pool whose connections show `application_name` in pg_stat_activity.

    Keeps trying for `connect_timeout` while the server does not answer (services often
    start together with their database), then raises DatabaseUnreachable.

    reset_session_state=False skips the query asyncpg sends on every release (RESET ALL,
    UNLISTEN *, CLOSE ALL, pg_advisory_unlock_all()): a round trip per acquire, for a
    service whose code never SETs, LISTENs, DECLAREs cursors or keeps advisory locks.

    lock_timeout_seconds bounds how long one statement waits for a row lock (PostgreSQL's
    lock_timeout); past it the statement fails as unavailable, so a row held by a long
    transaction elsewhere costs its own callers an error, not every caller the pool.
    """
    if isinstance(dsn, Secret):
        dsn = dsn.reveal()
    deadline = asyncio.get_running_loop().time() + connect_timeout
    server_settings = {"application_name": application_name}
    if lock_timeout_seconds is not None:
        server_settings["lock_timeout"] = f"{round(lock_timeout_seconds * 1000)}ms"
    while True:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=5,
                server_settings=server_settings,
                reset=None if reset_session_state else _keep_session_state,
            )
            break
        except _TRANSIENT_CONNECT_ERRORS as error:
            if asyncio.get_running_loop().time() >= deadline:
                raise DatabaseUnreachable(dsn, str(error) or type(error).__name__) from None
            log.warning("db.connect_retried", extra={"database": database_name(dsn), "error": str(error)})
            await asyncio.sleep(0.5)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as error:
            raise DatabaseUnreachable(dsn, str(error)) from None
    log.info(
        "db.pool_created",
        extra={"database": database_name(dsn), "min_size": min_size, "max_size": max_size},
    )
    return pool


@contextlib.asynccontextmanager
async def pooled_connection(pool: asyncpg.Pool, timeout: float) -> AsyncIterator[asyncpg.Connection]:
    """A connection of `pool`, waited for at most `timeout` seconds (TimeoutError after).

    asyncio.timeout rather than acquire(timeout=...), which runs every acquire through
    wait_for and shield, two tasks per call: on a one-statement RPC that was a visible
    part of the server's CPU.
    """
    async with asyncio.timeout(timeout):
        conn = await pool.acquire()
    try:
        yield conn
    finally:
        await pool.release(conn)


def _address(dsn: str) -> tuple[str, int]:
    try:
        parts = urlsplit(dsn)
        return parts.hostname or "localhost", parts.port or 5432
    except ValueError:
        return "?", 0


async def close_pool(pool: asyncpg.Pool, timeout: float = 10.0) -> None:
    """Waits up to `timeout` for borrowed connections, then cuts them: shutdown must end."""
    try:
        async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancellation on 3.11
            await pool.close()
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

"""Wires the credits service together and serves it until SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from services.credits.config import Config
from services.credits.handlers import ALLOWED_CALLERS, SERVICE_NAME, CreditsServicer, charge_rate_limit, register
from shared.auth import AuthInterceptor
from shared.db import close_pool, create_pool
from shared.grpc_server import RunningServer, ServiceSpec, serve_main, start_grpc_server
from shared.migrations import apply_migrations
from services.credits.metrics import ledger_metrics

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Calls in flight get this long to finish when the stack closes outside run_service.
_STOP_GRACE_SECONDS = 5.0
LOCK_TIMEOUT_SECONDS = 2.0


async def build(config: Config, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Open the pool, migrate, serve; every cleanup goes onto `stack`."""
    pool = await create_pool(
        config.database_url,
        min_size=config.db_pool_min_size,
        max_size=config.db_pool_max_size,
        application_name="casefile-credits",
        connect_timeout=config.database_connect_timeout_seconds,
        # Nothing here SETs, LISTENs or keeps advisory locks past a call (the migrations'
        # lock is released before the pool serves a request), so the release query only
        # cost a round trip on every Charge.
        reset_session_state=False,
        # Every write here locks its account's row for one statement (milliseconds, even on
        # a hot account); a lock held for seconds is someone else's long transaction, and
        # the calls waiting on it would otherwise hold the whole pool.
        lock_timeout_seconds=LOCK_TIMEOUT_SECONDS,
    )
    stack.push_async_callback(close_pool, pool)
    async with pool.acquire() as conn:
        # Migrations wait as long as it takes: for another process migrating (the advisory
        # lock) and for old processes' transactions on the tables they alter.
        await conn.execute("SET lock_timeout = 0")
        try:
            applied = await apply_migrations(conn, "credits", MIGRATIONS_DIR)
        finally:
            await conn.execute("RESET lock_timeout")  # back to the pool's, set at connect
    log.info("credits.migrated", extra={"applied": applied})
    servicer = CreditsServicer(pool, charge_rate_limit(config.charge_rate_per_second, config.charge_burst))
    running = await start_grpc_server(
        listen_addr=config.listen_addr,
        listen_addr_name="CREDITS_ADDR",
        services=[ServiceSpec(SERVICE_NAME, register(servicer))],
        interceptors=[AuthInterceptor(config.auth_tokens.reveal(), ALLOWED_CALLERS)],
        metrics_addr=config.metrics_addr,
    )
    # Pushed last so it runs first: calls drain before the pool they use closes. After
    # run_service's own graceful stop this second stop returns at once.
    stack.push_async_callback(running.stop, _STOP_GRACE_SECONDS)
    stack.callback(ledger_metrics(pool).close)  # unregistered first, before the pool closes
    return running


def main() -> None:
    serve_main("credits", Config.from_env, build)


if __name__ == "__main__":
    main()

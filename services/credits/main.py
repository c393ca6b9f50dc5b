"""Wires the credits service together and serves it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from services.credits.config import Config
from services.credits.handlers import ALLOWED_CALLERS, SERVICE_NAME, CreditsServicer, register
from shared.auth import AuthInterceptor
from shared.config import ConfigError
from shared.db import close_pool, create_pool
from shared.grpc_server import RunningServer, ServiceSpec, run_service, start_grpc_server
from shared.logs import configure_logging
from shared.migrations import apply_migrations

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Calls in flight get this long to finish when the stack closes outside run_service.
_STOP_GRACE_SECONDS = 5.0


async def build(config: Config, stack: contextlib.AsyncExitStack) -> RunningServer:
    """Open the pool, migrate, serve; every cleanup goes onto `stack`."""
    pool = await create_pool(
        config.database_url,
        min_size=config.db_pool_min_size,
        max_size=config.db_pool_max_size,
        application_name="casefile-credits",
    )
    stack.push_async_callback(close_pool, pool)
    async with pool.acquire() as conn:
        applied = await apply_migrations(conn, "credits", MIGRATIONS_DIR)
    log.info("credits.migrated", extra={"applied": applied})
    servicer = CreditsServicer(pool)
    running = await start_grpc_server(
        listen_addr=config.listen_addr,
        services=[ServiceSpec(SERVICE_NAME, register(servicer))],
        interceptors=[AuthInterceptor(config.auth_tokens.reveal(), ALLOWED_CALLERS)],
    )
    # Pushed last so it runs first: calls drain before the pool they use closes. After
    # run_service's own graceful stop this second stop returns at once.
    stack.push_async_callback(running.stop, _STOP_GRACE_SECONDS)
    return running


def main() -> None:
    configure_logging("credits")
    try:
        config = Config.from_env(os.environ)
    except ConfigError as error:
        log.error("config.invalid", extra={"error": str(error)})
        sys.exit(2)
    try:
        asyncio.run(run_service("credits", lambda stack: build(config, stack)))
    except Exception:
        # run_service already logged the cause as "service.failed"; a second, bare
        # traceback on stderr would only break the one-JSON-object-per-line stream.
        sys.exit(1)


if __name__ == "__main__":
    main()

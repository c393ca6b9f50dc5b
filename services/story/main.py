"""Start-up of the story service: read config, wire everything, serve, shut down."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import httpx

from casefile.story.v1 import story_service_pb2
from services.story.config import Config
from services.story.domain import WatchLimits
from services.story.handlers import ALLOWED_CALLERS, SERVICE_NAME, StoryServicer
from services.story.messaging import fill_missing_payloads, story_outbox_relay
from services.story.writers import build_writer
from shared.asyncio_network import asyncio_http_transport
from shared.auth import AuthInterceptor
from shared.background import start_supervised
from shared.change_feed import ChangeFeed
from shared.db import close_pool, create_pool
from shared.grpc_server import RunningServer, ServiceSpec, add_strictly_decoded, serve_main, start_grpc_server
from shared.migrations import apply_migrations
from shared.outbox import RelaySettings

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# What the trigger of migration 0002 NOTIFYs on every change of a story.
STORY_CHANGES_CHANNEL = "story_changes"


async def build(config: Config, stack: contextlib.AsyncExitStack) -> RunningServer:
    pool = await create_pool(
        config.database_url,
        application_name="casefile-story",
        connect_timeout=config.database_connect_timeout_seconds,
        # Pool connections never SET, LISTEN, DECLARE cursors or keep advisory locks (the
        # change feed and the outbox listener have connections of their own; the migrations
        # unlock before the pool serves a call), so the release query only cost a round
        # trip, and PostgreSQL's CPU, on every GetStory.
        reset_session_state=False,
    )
    stack.push_async_callback(close_pool, pool)
    async with pool.acquire() as conn:
        await apply_migrations(conn, "story", MIGRATIONS)

    await fill_missing_payloads(pool)
    relay = story_outbox_relay(
        pool,
        config.database_url,
        config.nats,
        settings=RelaySettings(
            batch_size=config.outbox_batch_size,
            claim_seconds=config.outbox_claim_seconds,
            poll_interval_seconds=config.outbox_poll_interval_seconds,
            retention_seconds=config.outbox_retention_seconds,
        ),
        stream_replicas=config.nats_stream_replicas,
    )
    stack.push_async_callback(relay.close)  # runs after the relay task is cancelled
    stack.callback(relay.backlog_metrics().close)
    await start_supervised(stack, relay.run, "outbox-relay")

    changes = ChangeFeed(
        config.database_url,
        channel=STORY_CHANGES_CHANNEL,
        max_watchers=config.max_watchers,
        application_name="casefile-story-watch",
        name="story",
    )
    changes.start()
    stack.push_async_callback(changes.stop)

    http = await stack.enter_async_context(httpx.AsyncClient(follow_redirects=False, transport=asyncio_http_transport()))
    writer = build_writer(config.writer, **_writer_settings(config), client=http)
    servicer = StoryServicer(
        pool,
        writer,
        events=relay,
        changes=changes,
        watch_limits=WatchLimits(max_seconds=config.watch_max_seconds),
    )
    server = await start_grpc_server(
        listen_addr=config.listen_addr,
        listen_addr_name="STORY_ADDR",
        services=[
            ServiceSpec(
                SERVICE_NAME,
                lambda s: add_strictly_decoded(s, story_service_pb2.DESCRIPTOR.services_by_name["StoryService"], servicer),
            )
        ],
        interceptors=[AuthInterceptor(config.auth_tokens.reveal(), ALLOWED_CALLERS)],
        metrics_addr=config.metrics_addr,
    )
    server.on_stop.append(changes.end_watches)
    # Registered last so it runs first: stop taking calls before the pool goes away.
    stack.push_async_callback(server.stop)
    return server


def _writer_settings(config: Config) -> dict[str, str | None]:
    """The key, base URL and model of the configured writer (the local one needs none)."""
    key, base_url, model = {
        "anthropic": (config.anthropic_api_key, config.anthropic_base_url, config.anthropic_model),
        "openai": (config.openai_api_key, config.openai_base_url, config.openai_story_model),
    }.get(config.writer, (None, None, None))
    return {"api_key": key.reveal() if key else None, "base_url": base_url, "model": model}


def main() -> None:
    serve_main("story", Config.from_env, build)


if __name__ == "__main__":
    main()

"""The story service's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import (
    ConfigError,
    NatsSettings,
    Secret,
    env_auth_tokens,
    env_database_secret,
    env_float,
    env_int,
    env_listen_addr,
    env_metrics_addr,
    env_secret,
    env_str,
    env_nats,
)
from shared.streams import DUPLICATE_WINDOW_SECONDS

WRITERS = ("local", "anthropic", "openai")


@dataclass(frozen=True)
class Config:
    listen_addr: str
    database_url: Secret[str]
    database_connect_timeout_seconds: float
    nats: NatsSettings
    nats_stream_replicas: int
    auth_tokens: Secret[Mapping[str, str]]
    writer: str
    anthropic_api_key: Secret[str] | None
    anthropic_base_url: str
    anthropic_model: str
    openai_api_key: Secret[str] | None
    openai_base_url: str
    openai_story_model: str
    outbox_poll_interval_seconds: float
    outbox_batch_size: int
    outbox_retention_seconds: float
    outbox_claim_seconds: float
    watch_max_seconds: float
    max_watchers: int
    # Where Prometheus metrics are served (METRICS_ADDR); None: no endpoint.
    metrics_addr: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        writer = env_str(env, "STORY_WRITER", "local")
        if writer not in WRITERS:
            raise ConfigError("STORY_WRITER", f"must be one of {', '.join(WRITERS)}, got {writer!r}")
        anthropic_api_key = env_secret(env, "ANTHROPIC_API_KEY", required=writer == "anthropic")
        openai_api_key = env_secret(env, "OPENAI_API_KEY", required=writer == "openai")
        claim_seconds = env_float(env, "OUTBOX_CLAIM_SECONDS", 30, minimum=0.1)
        if claim_seconds >= DUPLICATE_WINDOW_SECONDS:
            # A republish after a crash must fall inside JetStream's duplicate window.
            raise ConfigError("OUTBOX_CLAIM_SECONDS", f"must be below {DUPLICATE_WINDOW_SECONDS} (the stream's duplicate window)")
        return cls(
            metrics_addr=env_metrics_addr(env, "METRICS_ADDR"),
            listen_addr=env_listen_addr(env, "STORY_ADDR", "127.0.0.1:50051"),
            database_url=env_database_secret(env, "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/casefile"),
            database_connect_timeout_seconds=env_float(env, "DATABASE_CONNECT_TIMEOUT_SECONDS", 15, minimum=0),
            nats=env_nats(env),
            nats_stream_replicas=env_int(env, "NATS_STREAM_REPLICAS", 1, minimum=1),
            auth_tokens=env_auth_tokens(env),
            writer=writer,
            anthropic_api_key=anthropic_api_key,
            anthropic_base_url=env_str(env, "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            anthropic_model=env_str(env, "ANTHROPIC_MODEL", "claude-sonnet-4-5"),
            openai_api_key=openai_api_key,
            openai_base_url=env_str(env, "OPENAI_BASE_URL", "https://api.openai.com/v1"),
            openai_story_model=env_str(env, "OPENAI_STORY_MODEL", "gpt-4o-mini"),
            # LISTEN/NOTIFY wakes the relay at once; the poll only covers a lost notification.
            outbox_poll_interval_seconds=env_float(env, "OUTBOX_POLL_INTERVAL_SECONDS", 5.0, minimum=0.01),
            outbox_batch_size=env_int(env, "OUTBOX_BATCH_SIZE", 500, minimum=1),
            outbox_retention_seconds=env_float(env, "OUTBOX_RETENTION_SECONDS", 24 * 3600, minimum=0),
            outbox_claim_seconds=claim_seconds,
            watch_max_seconds=env_float(env, "WATCH_MAX_SECONDS", 900, minimum=0.1),
            max_watchers=env_int(env, "STORY_MAX_WATCHERS", 10_000, minimum=1),
        )

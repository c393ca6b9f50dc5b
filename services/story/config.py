"""The story service's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import (
    ConfigError,
    Secret,
    env_auth_tokens,
    env_database_url,
    env_float,
    env_listen_addr,
    env_secret,
    env_str,
)

WRITERS = ("local", "anthropic", "openai")


@dataclass(frozen=True)
class Config:
    listen_addr: str
    database_url: str
    database_connect_timeout_seconds: float
    nats_url: str
    auth_tokens: Secret[Mapping[str, str]]
    writer: str
    anthropic_api_key: Secret[str] | None
    anthropic_base_url: str
    anthropic_model: str
    openai_api_key: Secret[str] | None
    openai_base_url: str
    openai_story_model: str
    outbox_poll_interval_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        writer = env_str(env, "STORY_WRITER", "local")
        if writer not in WRITERS:
            raise ConfigError("STORY_WRITER", f"must be one of {', '.join(WRITERS)}, got {writer!r}")
        anthropic_api_key = env_secret(env, "ANTHROPIC_API_KEY", required=writer == "anthropic")
        openai_api_key = env_secret(env, "OPENAI_API_KEY", required=writer == "openai")
        return cls(
            listen_addr=env_listen_addr(env, "STORY_ADDR", "127.0.0.1:50051"),
            database_url=env_database_url(env, "DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/casefile"),
            database_connect_timeout_seconds=env_float(env, "DATABASE_CONNECT_TIMEOUT_SECONDS", 15, minimum=0),
            nats_url=env_str(env, "NATS_URL", "nats://127.0.0.1:4222"),
            auth_tokens=env_auth_tokens(env),
            writer=writer,
            anthropic_api_key=anthropic_api_key,
            anthropic_base_url=env_str(env, "ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            anthropic_model=env_str(env, "ANTHROPIC_MODEL", "claude-sonnet-4-5"),
            openai_api_key=openai_api_key,
            openai_base_url=env_str(env, "OPENAI_BASE_URL", "https://api.openai.com/v1"),
            openai_story_model=env_str(env, "OPENAI_STORY_MODEL", "gpt-4o-mini"),
            outbox_poll_interval_seconds=env_float(env, "OUTBOX_POLL_INTERVAL_SECONDS", 1.0, minimum=0.01),
        )

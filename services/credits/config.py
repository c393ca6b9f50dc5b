"""The credits service's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import Secret, env_auth_tokens, env_database_url, env_float, env_listen_addr
from shared.config import env_metrics_addr

DEFAULT_LISTEN_ADDR = "127.0.0.1:50053"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/casefile"


@dataclass(frozen=True)
class Config:
    listen_addr: str
    database_url: str
    database_connect_timeout_seconds: float
    # token -> caller name; wrapped so a repr or a log line never shows a token.
    auth_tokens: Secret[Mapping[str, str]]
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    # Where Prometheus metrics are served (METRICS_ADDR); None: no endpoint.
    metrics_addr: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        # The credits service calls nobody, so unlike story and image it needs no own token.
        return cls(
            metrics_addr=env_metrics_addr(env, "METRICS_ADDR"),
            listen_addr=env_listen_addr(env, "CREDITS_ADDR", DEFAULT_LISTEN_ADDR),
            database_url=env_database_url(env, "DATABASE_URL", DEFAULT_DATABASE_URL),
            database_connect_timeout_seconds=env_float(env, "DATABASE_CONNECT_TIMEOUT_SECONDS", 15, minimum=0),
            auth_tokens=env_auth_tokens(env, "AUTH_TOKENS"),
        )

"""The credits service's settings, read once from the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import ConfigError, Secret, env_auth_tokens, env_database_url, env_float, env_int, env_listen_addr
from shared.config import env_metrics_addr

DEFAULT_LISTEN_ADDR = "127.0.0.1:50053"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/casefile"
# Generous for a player (image jobs come a few a minute) and for the image service's
# retries (replays take no token), tight enough to stop a runaway loop draining an account.
DEFAULT_CHARGE_RATE_PER_SECOND = 20.0
DEFAULT_CHARGE_BURST = 200


@dataclass(frozen=True)
class Config:
    listen_addr: str
    database_url: str
    database_connect_timeout_seconds: float
    # token -> caller name; wrapped so a repr or a log line never shows a token.
    auth_tokens: Secret[Mapping[str, str]]
    # Each user's Charge token bucket: refilled at this many per second, holding at most burst.
    charge_rate_per_second: float = DEFAULT_CHARGE_RATE_PER_SECOND
    charge_burst: int = DEFAULT_CHARGE_BURST
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
            charge_rate_per_second=_positive(env_float(env, "CHARGE_RATE_PER_SECOND", DEFAULT_CHARGE_RATE_PER_SECOND),
                                             "CHARGE_RATE_PER_SECOND"),
            charge_burst=env_int(env, "CHARGE_BURST", DEFAULT_CHARGE_BURST, minimum=1),
        )


def _positive(value: float, name: str) -> float:
    if value <= 0:
        raise ConfigError(name, f"must be greater than 0, got {value:g}")
    return value

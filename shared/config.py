"""Reading configuration from environment variables, failing early with the variable's name.

Each service builds its own frozen config dataclass with these helpers. Every error names
the variable so an operator knows what to fix; no error ever echoes a secret.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

T = TypeVar("T")

_TRUE_WORDS = frozenset({"true", "1", "yes"})
_FALSE_WORDS = frozenset({"false", "0", "no"})
_CALLER_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
# Who calls the services (ARCHITECTURE.md); the services' tables of who may call what name
# only these, so a token for any other name could call nothing: a typo, said at start.
CALLERS = ("admin", "gateway", "image", "story")
# `name:sha256:<64 hex>` lists a caller by the SHA-256 of its token, so a process that must
# recognise a caller need not hold that caller's token in clear.
TOKEN_HASH_PREFIX = "sha256:"
_TOKEN_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_POSTGRES_SCHEMES = ("postgresql", "postgres")


class ConfigError(Exception):
    """A missing or malformed setting; the message starts with the variable's name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class Secret(Generic[T]):
    """Wraps a secret so that a repr, an f-string or a log line never shows it."""

    _value: T = field(repr=False)

    def reveal(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def _raw(env: Mapping[str, str], name: str) -> str | None:
    # An empty variable is how shells and compose files say "unset", so treat it as missing.
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = _raw(env, name)
    if value is not None:
        return value
    if default is None:
        raise ConfigError(name, "is required")
    return default


def env_secret(env: Mapping[str, str], name: str, *, required: bool = False) -> Secret[str] | None:
    """An API key or password; None when unset and not required."""
    value = _raw(env, name)
    if value is None:
        if required:
            raise ConfigError(name, "is required")
        return None
    return Secret(value)


def env_int(
    env: Mapping[str, str], name: str, default: int | None = None, *, minimum: int | None = None
) -> int:
    value = _raw(env, name)
    if value is None:
        if default is None:
            raise ConfigError(name, "is required")
        number = default
    else:
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {number}")
    return number


def env_float(
    env: Mapping[str, str],
    name: str,
    default: float | None = None,
    *,
    minimum: float | None = None,
) -> float:
    value = _raw(env, name)
    if value is None:
        if default is None:
            raise ConfigError(name, "is required")
        number = float(default)
    else:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {number}")
    return number


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(name, f"must be true/false/1/0/yes/no, got {value!r}")


def env_listen_addr(env: Mapping[str, str], name: str, default: str) -> str:
    """A "host:port" to bind; port 0 (any free port) is allowed for tests."""
    addr = env_str(env, name, default)
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ConfigError(name, f"must look like host:port, got {addr!r}")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(name, f"an IPv6 host needs both brackets, got {addr!r}")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(name, f"port must be 0-65535, got {addr!r}")
    return addr


def env_metrics_addr(env: Mapping[str, str], name: str = "METRICS_ADDR") -> str | None:
    """Where to serve Prometheus metrics ("host:port"); None (no endpoint, no metrics) when unset or empty."""
    if _raw(env, name) is None:
        return None
    return env_listen_addr(env, name, "")


def env_database_url(
    env: Mapping[str, str], name: str = "DATABASE_URL", default: str | None = None
) -> str:
    url = env_str(env, name, default)
    # The URL may carry a password, so the messages below never repeat it.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(name, "is not a valid URL") from None
    if parts.scheme not in _POSTGRES_SCHEMES:
        raise ConfigError(name, "must be a postgresql:// URL")
    if not parts.path.strip("/"):
        raise ConfigError(name, "must name a database, e.g. postgresql://host:5432/casefile")
    return url


def parse_auth_tokens(raw: str, name: str = "AUTH_TOKENS") -> Mapping[str, str]:
    """token -> caller name from "admin:tok1,gateway:sha256:<hex>"; a caller may hold several.

    A hashed entry stays "sha256:<hex>" in the mapping; shared.auth compares it to the hash
    of the presented token."""
    entries = raw.split(",")
    if not raw.strip():
        raise ConfigError(name, "must list at least one name:token")
    tokens: dict[str, str] = {}
    first_position: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        caller, token = _parse_token_entry(name, position, entry)
        if token in tokens:
            raise ConfigError(
                name, f"entry {position} repeats the token of entry {first_position[token]}"
            )
        tokens[token] = caller
        first_position[token] = position
    return types.MappingProxyType(tokens)


def _parse_token_entry(name: str, position: int, entry: str) -> tuple[str, str]:
    # Messages name the entry by position and caller only: the entry itself may be a token.
    caller, sep, token = entry.partition(":")
    caller, token = caller.strip(), token.strip()
    if not sep:
        raise ConfigError(name, f"entry {position} must look like name:token")
    if not _CALLER_NAME.match(caller):
        raise ConfigError(
            name, f"entry {position} needs a caller name of lowercase letters, digits, - or _"
        )
    if caller not in CALLERS:
        raise ConfigError(name, f"entry {position} names caller '{caller}', which no service knows "
                                f"(the callers are {', '.join(CALLERS)})")  # fmt: skip
    if not token:
        raise ConfigError(name, f"entry {position} ({caller}) has an empty token")
    if token.lower().startswith(TOKEN_HASH_PREFIX):
        token = token.lower()
        if not _TOKEN_HASH.match(token):
            raise ConfigError(name, f"entry {position} ({caller}) must be sha256: and 64 hex digits")
    return caller, token


def env_auth_tokens(env: Mapping[str, str], name: str = "AUTH_TOKENS") -> Secret[Mapping[str, str]]:
    """Required: outside `make run` a service without tokens refuses to start."""
    raw = _raw(env, name)
    if raw is None:
        raise ConfigError(name, "is required (name:token,name:token,...)")
    return Secret(parse_auth_tokens(raw, name))


def env_database_secret(
    env: Mapping[str, str], name: str = "DATABASE_URL", default: str | None = None
) -> Secret[str]:
    """DATABASE_URL checked as env_database_url does, kept as a Secret: it may hold a password."""
    return Secret(env_database_url(env, name, default))


@dataclass(frozen=True)
class NatsSettings:
    """Where NATS is and how to log in; the URL kept here never carries credentials."""

    url: str
    user: str | None = None
    password: Secret[str] | None = None
    token: Secret[str] | None = None

    def __repr__(self) -> str:
        login = "token" if self.token else ("user" if self.user else "none")
        return f"NatsSettings(url={self.url!r}, login={login})"

    __str__ = __repr__

    def connect_options(self) -> dict[str, str]:
        """The nats-py connect() keywords for the login."""
        options: dict[str, str] = {}
        if self.user:
            options["user"] = self.user
        if self.password:
            options["password"] = self.password.reveal()
        if self.token:
            options["token"] = self.token.reveal()
        return options


def nats_settings(
    name: str,
    url: str,
    *,
    user: Secret[str] | None = None,
    password: Secret[str] | None = None,
    token: Secret[str] | None = None,
) -> NatsSettings:
    """NATS_URL (credentials in it are moved out of the URL) plus NATS_USER/PASSWORD/TOKEN."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(name, "is not a valid URL") from None
    if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
        raise ConfigError(name, "must look like nats://host:4222")
    in_url_user = unquote(parts.username) if parts.username else None
    in_url_password = unquote(parts.password) if parts.password else None
    if in_url_user and in_url_password is None and token is None:
        # nats://<token>@host is how NATS spells a token in a URL.
        token, in_url_user = Secret(in_url_user), None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{parts.port}" if parts.port else host
    clean = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    login_user = user.reveal() if user else in_url_user
    login_password = password or (Secret(in_url_password) if in_url_password else None)
    if login_password is not None and not login_user:
        raise ConfigError(name, "a NATS password needs a user (NATS_USER)")
    return NatsSettings(url=clean, user=login_user, password=login_password, token=token)


def env_nats(env: Mapping[str, str], default_url: str = "nats://127.0.0.1:4222") -> NatsSettings:
    """NATS_URL and the login: NATS_TOKEN, or NATS_USER with NATS_PASSWORD (or in the URL)."""
    return nats_settings(
        "NATS_URL",
        env_str(env, "NATS_URL", default_url),
        user=env_secret(env, "NATS_USER"),
        password=env_secret(env, "NATS_PASSWORD"),
        token=env_secret(env, "NATS_TOKEN"),
    )

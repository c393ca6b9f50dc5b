"""The image service's settings, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.image.cdn import UnusableKey, load_private_key
from services.image.providers import PORTRAIT_PROVIDERS
from shared.config import (
    TOKEN_HASH_PREFIX,
    ConfigError,
    NatsSettings,
    Secret,
    env_auth_tokens,
    env_bool,
    env_database_secret,
    env_float,
    env_int,
    env_listen_addr,
    env_metrics_addr,
    env_secret,
    env_str,
    env_nats,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/casefile"
DEFAULT_REDELIVERY_BACKOFF = "2,5,15,30,60,120,300"
RECRAFT_DEFAULT_BASE_URL = "https://external.api.recraft.ai/v1"
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENROUTER_DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
GEMINI_DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
STABILITY_DEFAULT_BASE_URL = "https://api.stability.ai"
# The name under which AUTH_TOKENS may list this service's own token for outgoing calls;
# IMAGE_TOKEN, when set, is used instead (AUTH_TOKENS may then hold only hashes).
OWN_CALLER_NAME = "image"
# Portraits wait on the network, not the CPU: a provider takes seconds per image.
DEFAULT_PORTRAIT_CONCURRENCY = 16
DEFAULT_MAX_ACK_PENDING = 1000
DEFAULT_JOB_RETRY_BACKOFF = "2,4,8"
# Jobs wait on providers too; a thousand in flight in one process cost memory, not CPU.
DEFAULT_JOB_CONCURRENCY = 256
DEFAULT_JOB_MAX_ACK_PENDING = 10_000


@dataclass(frozen=True)
class VendorSettings:
    """One vendor API: its key (None: not configured) and base URL."""

    api_key: Secret[str] | None
    base_url: str


@dataclass(frozen=True)
class ProviderSettings:
    """The generation jobs' providers (CONTRACT.md's operations table) and their breakers."""

    openai: VendorSettings
    openrouter: VendorSettings
    gemini: VendorSettings
    stability: VendorSettings
    recraft: VendorSettings
    allow_private_downloads: bool
    request_timeout_seconds: float
    breaker_failure_threshold: int
    breaker_cool_down_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProviderSettings:
        return cls(
            # Each name is spelled out in its call so that tools scanning config.py see it.
            openai=VendorSettings(
                env_secret(env, "OPENAI_API_KEY"), _base_url(env, "OPENAI_BASE_URL", OPENAI_DEFAULT_BASE_URL)
            ),
            openrouter=VendorSettings(
                env_secret(env, "OPENROUTER_API_KEY"),
                _base_url(env, "OPENROUTER_BASE_URL", OPENROUTER_DEFAULT_BASE_URL),
            ),
            # Google's SDKs read either name; GEMINI_API_KEY wins when both are set.
            gemini=VendorSettings(
                env_secret(env, "GEMINI_API_KEY") or env_secret(env, "GOOGLE_API_KEY"),
                _base_url(env, "GEMINI_BASE_URL", GEMINI_DEFAULT_BASE_URL),
            ),
            stability=VendorSettings(
                env_secret(env, "STABILITY_API_KEY"),
                _base_url(env, "STABILITY_BASE_URL", STABILITY_DEFAULT_BASE_URL),
            ),
            recraft=VendorSettings(
                env_secret(env, "RECRAFT_API_KEY"), _base_url(env, "RECRAFT_BASE_URL", RECRAFT_DEFAULT_BASE_URL)
            ),
            allow_private_downloads=env_bool(env, "ALLOW_PRIVATE_DOWNLOADS", False),
            # gpt-image-1 at high quality says nothing for a minute or more before it answers.
            request_timeout_seconds=env_float(env, "PROVIDER_REQUEST_TIMEOUT_SECONDS", 240, minimum=1),
            breaker_failure_threshold=env_int(env, "PROVIDER_BREAKER_FAILURES", 5, minimum=1),
            breaker_cool_down_seconds=env_float(env, "PROVIDER_BREAKER_COOL_DOWN_SECONDS", 30, minimum=0.1),
        )

    def configured(self) -> tuple[str, ...]:
        """The vendors whose key is set (for the start-up log: never the keys)."""
        vendors = {"openai": self.openai, "openrouter": self.openrouter, "gemini": self.gemini}
        vendors |= {"stability": self.stability, "recraft": self.recraft}
        return tuple(name for name, vendor in vendors.items() if vendor.api_key is not None)


@dataclass(frozen=True)
class CloudFrontSettings:
    """Where GetImageUrl signs CloudFront URLs instead of presigned S3 ones."""

    domain: str
    key_pair_id: str
    private_key_pem: Secret[str]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CloudFrontSettings | None:
        domain = _optional(env, "CLOUDFRONT_DOMAIN")
        key_pair_id = _optional(env, "CLOUDFRONT_KEY_PAIR_ID")
        private_key = env_secret(env, "CLOUDFRONT_PRIVATE_KEY")
        given = [name for name, value in (("CLOUDFRONT_DOMAIN", domain), ("CLOUDFRONT_KEY_PAIR_ID", key_pair_id),
                                          ("CLOUDFRONT_PRIVATE_KEY", private_key)) if value]  # fmt: skip
        if not given:
            return None
        if len(given) < 3:
            missing = sorted({"CLOUDFRONT_DOMAIN", "CLOUDFRONT_KEY_PAIR_ID", "CLOUDFRONT_PRIVATE_KEY"} - set(given))
            raise ConfigError(missing[0], "is required when any CLOUDFRONT_* variable is set")
        if "/" in domain or ":" in domain:  # type: ignore[operator]
            raise ConfigError("CLOUDFRONT_DOMAIN", "must be a host name such as d111111abcdef8.cloudfront.net")
        try:
            load_private_key(private_key.reveal())  # type: ignore[union-attr]
        except UnusableKey as error:
            raise ConfigError("CLOUDFRONT_PRIVATE_KEY", str(error)) from None
        return cls(domain, key_pair_id, private_key)  # type: ignore[arg-type]


@dataclass(frozen=True)
class JobSettingsFromEnv:
    concurrency: int
    max_ack_pending: int
    ack_wait_seconds: float
    intent_seconds: float
    max_seconds: float
    retry_backoff_seconds: tuple[float, ...]
    max_watchers: int
    watch_max_seconds: float
    watch_recheck_seconds: float
    outbox_poll_interval_seconds: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> JobSettingsFromEnv:
        concurrency = env_int(env, "JOB_CONCURRENCY", DEFAULT_JOB_CONCURRENCY, minimum=1)
        max_ack_pending = env_int(env, "JOB_MAX_ACK_PENDING", DEFAULT_JOB_MAX_ACK_PENDING, minimum=1)
        if max_ack_pending < concurrency:
            raise ConfigError("JOB_MAX_ACK_PENDING", "must be at least JOB_CONCURRENCY (and far above it)")
        backoff = _delays(env_str(env, "JOB_RETRY_BACKOFF_SECONDS", DEFAULT_JOB_RETRY_BACKOFF), "JOB_RETRY_BACKOFF_SECONDS")
        return cls(
            concurrency=concurrency,
            max_ack_pending=max_ack_pending,
            # A crashed process holds its jobs this long; live ones send heartbeats.
            ack_wait_seconds=env_float(env, "JOB_ACK_WAIT_SECONDS", 15, minimum=1),
            # Longer than any create can take (its calls are bounded well below it).
            intent_seconds=env_float(env, "JOB_INTENT_SECONDS", 60, minimum=1),
            max_seconds=env_float(env, "JOB_MAX_SECONDS", 900, minimum=1),
            retry_backoff_seconds=backoff,
            max_watchers=env_int(env, "JOB_MAX_WATCHERS", 1000, minimum=1),
            watch_max_seconds=env_float(env, "JOB_WATCH_MAX_SECONDS", 900, minimum=0.1),
            watch_recheck_seconds=env_float(env, "JOB_WATCH_RECHECK_SECONDS", 10, minimum=0.1),
            outbox_poll_interval_seconds=env_float(env, "OUTBOX_POLL_INTERVAL_SECONDS", 5.0, minimum=0.01),
        )


@dataclass(frozen=True)
class Config:
    listen_addr: str
    database_url: Secret[str]
    database_connect_timeout_seconds: float
    nats: NatsSettings
    nats_stream_replicas: int
    s3_endpoint_url: str | None
    s3_public_endpoint_url: str | None
    s3_bucket: str
    s3_region: str
    story_addr: str
    auth_tokens: Secret
    outgoing_token: Secret
    portrait_provider: str
    recraft_api_key: Secret | None
    recraft_base_url: str
    allow_private_downloads: bool
    portrait_concurrency: int
    portrait_max_ack_pending: int
    portrait_max_deliver: int
    portrait_redelivery_backoff_seconds: tuple[float, ...]
    portrait_attempt_budget_seconds: float
    portrait_ack_wait_seconds: float
    portrait_shutdown_grace_seconds: float
    portrait_provider_timeout_seconds: float
    portrait_step_timeout_seconds: float
    providers: ProviderSettings
    credits_addr: str
    jobs: JobSettingsFromEnv
    # "AES256" (the default) for players' images; None where the store offers none.
    s3_server_side_encryption: str | None
    cloudfront: CloudFrontSettings | None
    # Where Prometheus metrics are served (METRICS_ADDR); None: no endpoint.
    metrics_addr: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        tokens = env_auth_tokens(env)
        max_deliver = env_int(env, "PORTRAIT_MAX_DELIVER", 8, minimum=1)
        concurrency = env_int(env, "PORTRAIT_CONCURRENCY", DEFAULT_PORTRAIT_CONCURRENCY, minimum=1)
        max_ack_pending = env_int(env, "PORTRAIT_MAX_ACK_PENDING", DEFAULT_MAX_ACK_PENDING, minimum=1)
        if max_ack_pending < concurrency:
            raise ConfigError("PORTRAIT_MAX_ACK_PENDING", "must be at least PORTRAIT_CONCURRENCY (and far above it)")
        return cls(
            metrics_addr=env_metrics_addr(env, "METRICS_ADDR"),
            listen_addr=env_listen_addr(env, "IMAGE_ADDR", "127.0.0.1:50052"),
            database_url=env_database_secret(env, "DATABASE_URL", DEFAULT_DATABASE_URL),
            database_connect_timeout_seconds=env_float(env, "DATABASE_CONNECT_TIMEOUT_SECONDS", 15, minimum=0),
            nats=env_nats(env),
            nats_stream_replicas=env_int(env, "NATS_STREAM_REPLICAS", 1, minimum=1),
            s3_endpoint_url=_optional_url(env, "S3_ENDPOINT_URL"),
            s3_public_endpoint_url=_optional_url(env, "S3_PUBLIC_ENDPOINT_URL"),
            s3_bucket=env_str(env, "S3_BUCKET", "casefile"),
            s3_region=env_str(env, "S3_REGION", env_str(env, "AWS_DEFAULT_REGION", "us-east-1")),
            story_addr=env_str(env, "STORY_ADDR", "127.0.0.1:50051"),
            auth_tokens=tokens,
            outgoing_token=_own_token(env_secret(env, "IMAGE_TOKEN"), tokens),
            portrait_provider=_provider_name(env),
            recraft_api_key=env_secret(env, "RECRAFT_API_KEY"),
            recraft_base_url=env_str(env, "RECRAFT_BASE_URL", RECRAFT_DEFAULT_BASE_URL),
            allow_private_downloads=env_bool(env, "ALLOW_PRIVATE_DOWNLOADS", False),
            portrait_concurrency=concurrency,
            # Bounds the whole consumer across every process, messages waiting out a retry
            # delay included; concurrency per process is bounded by what each one fetches.
            portrait_max_ack_pending=max_ack_pending,
            portrait_max_deliver=max_deliver,
            portrait_redelivery_backoff_seconds=_backoff_list(env),
            portrait_attempt_budget_seconds=env_float(
                env, "PORTRAIT_ATTEMPT_BUDGET_SECONDS", 60, minimum=0.1
            ),
            # A crashed process holds its portraits this long; live ones send heartbeats.
            portrait_ack_wait_seconds=env_float(env, "PORTRAIT_ACK_WAIT_SECONDS", 15, minimum=1),
            portrait_shutdown_grace_seconds=env_float(
                env, "PORTRAIT_SHUTDOWN_GRACE_SECONDS", 5, minimum=0
            ),
            portrait_provider_timeout_seconds=env_float(env, "PORTRAIT_PROVIDER_TIMEOUT_SECONDS", 90, minimum=0.1),
            portrait_step_timeout_seconds=env_float(env, "PORTRAIT_STEP_TIMEOUT_SECONDS", 10, minimum=0.1),
            providers=ProviderSettings.from_env(env),
            credits_addr=env_str(env, "CREDITS_ADDR", "127.0.0.1:50053"),
            jobs=JobSettingsFromEnv.from_env(env),
            s3_server_side_encryption=_encryption(env_str(env, "S3_SERVER_SIDE_ENCRYPTION", "AES256")),
            cloudfront=CloudFrontSettings.from_env(env),
        )


def _provider_name(env: Mapping[str, str]) -> str:
    name = env_str(env, "PORTRAIT_PROVIDER", "local").lower()
    if name not in PORTRAIT_PROVIDERS:
        choices = ", ".join(PORTRAIT_PROVIDERS)
        raise ConfigError("PORTRAIT_PROVIDER", f"must be one of {choices}, got {name!r}")
    return name


def _optional_url(env: Mapping[str, str], name: str) -> str | None:
    """An http(s) URL when set (S3's endpoint), None when not."""
    return _base_url(env, name, "http://127.0.0.1:9000") if _optional(env, name) else None


def _base_url(env: Mapping[str, str], name: str, default: str) -> str:
    url = env_str(env, name, default)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(name, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"must be an http(s) URL such as {default}")
    return url.rstrip("/")


def _optional(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _own_token(own: Secret[str] | None, tokens: Secret) -> Secret:
    if own is not None:
        return own
    for token, caller in tokens.reveal().items():
        if caller == OWN_CALLER_NAME and not token.startswith(TOKEN_HASH_PREFIX):
            return Secret(token)
    raise ConfigError(
        "IMAGE_TOKEN", f"is required unless AUTH_TOKENS holds '{OWN_CALLER_NAME}' in clear (used to call story)"
    )


def _backoff_list(env: Mapping[str, str]) -> tuple[float, ...]:
    # The name is spelled out in the call so that tools scanning config.py see it.
    raw = env_str(env, "PORTRAIT_REDELIVERY_BACKOFF_SECONDS", DEFAULT_REDELIVERY_BACKOFF)
    return _delays(raw, "PORTRAIT_REDELIVERY_BACKOFF_SECONDS")


def _delays(raw: str, name: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(name, f"must be a comma list of seconds, got {raw!r}") from None
    if any(not delay > 0 or delay > 86_400 for delay in delays):
        raise ConfigError(name, "every delay must be above 0 and at most 86400 seconds")
    return delays


def _encryption(raw: str) -> str | None:
    choices = {"aes256": "AES256", "aws:kms": "aws:kms", "none": None, "": None}
    if raw.strip().lower() not in choices:
        raise ConfigError("S3_SERVER_SIDE_ENCRYPTION", "must be AES256, aws:kms or none")
    return choices[raw.strip().lower()]

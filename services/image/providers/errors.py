"""What can go wrong with a provider call, in the three kinds the job worker acts on.

- TRANSIENT: connection, timeout, 408/429/5xx. Try again with backoff (a longer
  Retry-After wins); the breaker counts them.
- USER: the request itself is refused for good: content policy, invalid parameters. Not
  retried and not refunded: the same request would be refused again.
- SERVER: our side is broken for good: the vendor's quota or credits are used up, our key
  is refused, the answer was unusable. Not retried, refunded.
"""

from __future__ import annotations

import enum

# Reasons end up in job rows and user-facing messages; a provider's raw body can be long
# or echo the request, so only a short prefix is ever kept.
MAX_REASON_CHARS = 200


class FailureKind(enum.StrEnum):
    TRANSIENT = "transient"
    USER = "user"
    SERVER = "server"


class ProviderError(Exception):
    """A provider call failed; `kind` says whether to retry and whether to refund.

    Built either with `kind` or, as the portrait pipeline does, with `transient` alone (a
    non-transient error is then a SERVER one: refunded, since we cannot tell it was the
    user's fault).
    """

    default_kind = FailureKind.SERVER

    def __init__(
        self,
        reason: str,
        *,
        transient: bool | None = None,
        kind: FailureKind | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        code: str | None = None,
        provider: str | None = None,
    ) -> None:
        if kind is None:
            kind = FailureKind.TRANSIENT if transient else self.default_kind
        self.kind = kind
        self.reason = trim_reason(reason)
        self.retry_after = retry_after
        self.status = status
        # The vendor's own error code ("insufficient_quota", "RESOURCE_EXHAUSTED"...).
        self.code = code
        self.provider = provider
        super().__init__(self.reason)

    @property
    def transient(self) -> bool:
        return self.kind is FailureKind.TRANSIENT

    @property
    def refundable(self) -> bool:
        """Whether the player gets the credits back when this ends their job."""
        return self.kind is not FailureKind.USER


class ProviderUnavailable(ProviderError):
    """The provider cannot answer right now (network, timeout, rate limit, 5xx, open circuit)."""

    default_kind = FailureKind.TRANSIENT


class ContentRefused(ProviderError):
    """The provider's safety system refused the prompt or the picture."""

    default_kind = FailureKind.USER


class InvalidRequest(ProviderError):
    """The provider (or the catalog, before any call) refused the request's parameters."""

    default_kind = FailureKind.USER


class ProviderAccountUnusable(ProviderError):
    """Our account at the vendor cannot be used: key refused, quota or credits exhausted.

    Every call will fail the same way until an operator acts, so the router fails over at
    once and the breaker opens without waiting for more failures.
    """

    default_kind = FailureKind.SERVER


class ProviderNotConfigured(ProviderAccountUnusable):
    """The provider's API key is missing: no call was made and none will succeed."""

    def __init__(self, reason: str, **options) -> None:
        super().__init__(reason, kind=FailureKind.SERVER, **options)


def is_transient(error: BaseException) -> bool:
    """The `is_transient` to give call_with_retries for provider calls."""
    return isinstance(error, ProviderError) and error.transient


def retry_after_of(error: BaseException) -> float | None:
    """The `retry_after` to give call_with_retries for provider calls."""
    return error.retry_after if isinstance(error, ProviderError) else None


def trim_reason(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) <= MAX_REASON_CHARS:
        return text
    return text[: MAX_REASON_CHARS - 3] + "..."

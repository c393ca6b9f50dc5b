"""The one small interface every portrait/image provider implements, and its errors."""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Protocol

# Reasons end up in job rows and user-facing messages; a provider's raw body can be long
# or echo the request, so only a short prefix is ever kept.
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    content_type: str
    width: int
    height: int


class ImageProvider(Protocol):
    name: str

    async def generate(
        self, *, prompt: str, width: int, height: int, model: str | None = None
    ) -> GeneratedImage: ...


class ProviderError(Exception):
    """A provider call failed; `transient` says whether trying again can help."""

    def __init__(
        self,
        reason: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        self.reason = trim_reason(reason)
        self.transient = transient
        self.retry_after = retry_after
        self.status = status
        super().__init__(self.reason)


class ProviderNotConfigured(ProviderError):
    """The provider's API key is missing: no call was made and none will succeed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=False)


def trim_reason(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) <= MAX_REASON_CHARS:
        return text
    return text[: MAX_REASON_CHARS - 3] + "..."


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())

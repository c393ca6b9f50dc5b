"""The interface every story writer implements, and its error."""

from __future__ import annotations

import email.utils
import time
from typing import Any, Protocol

MAX_REASON_CHARS = 200


class StoryWriter(Protocol):
    name: str

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        """Returns {title, patient {name, age, diagnosis, appearance}, chapters [{title, text}] x3,
        image_generation_prompt}; the story domain validates it like CreateStory content."""
        ...


class WriterError(Exception):
    """Writing failed; `transient` says whether trying again can help."""

    def __init__(
        self,
        reason: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        reason = " ".join(str(reason).split())
        self.reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
        self.transient = transient
        self.retry_after = retry_after
        self.status = status
        super().__init__(self.reason)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())

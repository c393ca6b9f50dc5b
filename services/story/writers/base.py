"""The interface every story writer implements, and its error."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any, Protocol

MAX_REASON_CHARS = 200


class StoryWriter(Protocol):
    name: str  # the STORY_WRITER value
    model: str  # the model behind it, as its API names it

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        """Returns a case file that passes story_json.check_story: {title, patient {name, age,
        gender, admission_date, diagnosis, appearance}, chapters [{title, text}] x3..7,
        image_generation_prompt}; the story domain validates it again like CreateStory content.

        `seed` names the request (the user and their request_id, or the new story's id when
        there is none): the same seed and theme give the local writer the same story, and the
        model writers the same brief. It is never sent to a model as it is.
        """
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
        api_error: Mapping[str, Any] | None = None,
    ) -> None:
        reason = " ".join(str(reason).split())
        self.reason = reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
        self.transient = transient
        self.retry_after = retry_after
        self.status = status
        # The provider's own error object, so a writer can adapt to what the API refused.
        self.api_error = api_error
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

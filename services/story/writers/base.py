"""The interface every story writer implements, and its error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

# One Retry-After parser for every service; kept importable from here for the writers.
from shared.retry import parse_retry_after

__all__ = ["StoryWriter", "WriterError", "parse_retry_after"]

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

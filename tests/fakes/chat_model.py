"""What the fake chat-model APIs (Anthropic, OpenAI) share: a sample case file and a queue of
scripted replies. Each fake turns a ScriptedReply into its own API's response shape."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

SAMPLE_STORY = {
    "title": "The Quiet Ward",
    "patient": {
        "name": "Agnes Marsh",
        "age": 34,
        "gender": "female",
        "admission_date": "1894-03-12",
        "diagnosis": "melancholia",
        "appearance": "gaunt, grey-eyed, in a stained gown",
    },
    "chapters": [
        {"title": "Admission", "text": "She came in the rain.\n\nNobody signed for her."},
        {"title": "Observation", "text": "She counts the bars.\n\nThere are always more."},
        {"title": "The Last Entry", "text": "The bed was made.\n\nThe window was painted shut."},
    ],
    "image_generation_prompt": "Portrait of a gaunt woman in a stained asylum gown, gaslight",
}


@dataclass(frozen=True)
class ScriptedReply:
    text: str
    truncated: bool = False  # the model ran out of tokens
    refusal: str | None = None  # the model declined; `text` is whatever it wrote first


class ScriptedReplies:
    """The scripted replies, in order; None once they are used up (the fake's default answers)."""

    def __init__(self) -> None:
        self._queue: deque[ScriptedReply] = deque()

    def reply_next(self, text: str, *, truncated: bool = False, refusal: str | None = None, count: int = 1) -> None:
        for _ in range(count):
            self._queue.append(ScriptedReply(text, truncated, refusal))

    def take(self) -> ScriptedReply | None:
        return self._queue.popleft() if self._queue else None


SAMPLE_REPLY = ScriptedReply(json.dumps(SAMPLE_STORY))

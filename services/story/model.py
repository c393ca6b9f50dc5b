"""What a story is: the plain data the domain, the storage, the handlers and the writers
share, and the limits of a case file. These limits are the only copy: the domain enforces
them on every story (CreateStory content and the writers' drafts alike), the writers ask
the models for them, and the proto states them."""

from __future__ import annotations

import datetime
import string
from dataclasses import dataclass
from enum import StrEnum


class PortraitStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


FINAL_PORTRAIT_STATUSES = frozenset({PortraitStatus.READY, PortraitStatus.FAILED, PortraitStatus.SKIPPED})


class Gender(StrEnum):
    FEMALE = "female"
    MALE = "male"
    OTHER = "other"


# --- the limits of a case file -------------------------------------------------------------

MAX_TITLE_CHARS = 200
MAX_NAME_CHARS = 200
MIN_AGE = 0
MAX_AGE = 130
MAX_DIAGNOSIS_CHARS = 500
MAX_APPEARANCE_CHARS = 2000
EARLIEST_ADMISSION = datetime.date(1800, 1, 1)
LATEST_ADMISSION = datetime.date(2100, 12, 31)
MIN_CHAPTERS = 3
MAX_CHAPTERS = 7
MAX_CHAPTER_TITLE_CHARS = 200
MAX_CHAPTER_TEXT_CHARS = 20_000
MAX_IMAGE_PROMPT_CHARS = 4000
MAX_THEME_CHARS = 500
# Players type titles and chapters on an ordinary keyboard: letters, digits, spaces and
# plain punctuation. Markdown or HTML would have to be typed literally, so none of that;
# newlines only between the paragraphs of a chapter's text.
TYPEABLE_CHARS = frozenset(string.ascii_letters + string.digits + " .,;:!?'\"()-/&%$")
PARAGRAPH_BREAK = "\n"


def untypeable_chars(text: str, *, newlines: bool = False) -> list[str]:
    """The characters of `text` a player could not type, sorted; empty when it is all typeable."""
    allowed = TYPEABLE_CHARS | {PARAGRAPH_BREAK} if newlines else TYPEABLE_CHARS
    return sorted(set(text) - allowed)


# --- the data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    name: str
    age: int
    diagnosis: str
    appearance: str
    # None only on stories written before they were recorded.
    gender: Gender | None = None
    admission_date: datetime.date | None = None


@dataclass(frozen=True)
class Chapter:
    title: str
    text: str


@dataclass(frozen=True)
class StoryContent:
    title: str
    patient: Patient | None
    chapters: tuple[Chapter, ...]
    image_generation_prompt: str


# Who wrote a story given to CreateStory.
CALLER_WRITER = "caller"


@dataclass(frozen=True)
class Authorship:
    """Who wrote a story and what they were asked for; empty on stories written before it was kept."""

    writer: str = ""
    model: str = ""
    theme: str = ""


@dataclass(frozen=True)
class Story:
    story_id: str
    user_id: str
    content: StoryContent
    storage_id: str
    portrait_status: PortraitStatus
    portrait_error: str
    portrait_attempt: int
    create_time: datetime.datetime
    update_time: datetime.datetime
    typing_difficulty: int = 0
    authorship: Authorship = Authorship()


@dataclass(frozen=True)
class StoryPage:
    stories: list[Story]
    next_page_token: str


@dataclass(frozen=True)
class PageCursor:
    """Where a page of ListStories ended: the last story's (create_time, story_id)."""

    create_time: datetime.datetime
    story_id: str

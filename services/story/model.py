"""What a story is: the plain data the domain, the storage and the handlers share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class PortraitStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


FINAL_PORTRAIT_STATUSES = frozenset({PortraitStatus.READY, PortraitStatus.FAILED, PortraitStatus.SKIPPED})


@dataclass(frozen=True)
class Patient:
    name: str
    age: int
    diagnosis: str
    appearance: str


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


@dataclass(frozen=True)
class Story:
    story_id: str
    user_id: str
    content: StoryContent
    storage_id: str
    portrait_status: PortraitStatus
    portrait_error: str
    portrait_attempt: int
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class StoryPage:
    stories: list[Story]
    next_page_token: str


@dataclass(frozen=True)
class PageCursor:
    """Where a page of ListStories ended: the last story's (create_time, story_id)."""

    create_time: datetime
    story_id: str

"""A valid CreateStory case file for tests, with any field overridden."""

from __future__ import annotations

from typing import Any

from casefile.story.v1 import story_service_pb2 as pb

CHAPTERS = (
    ("Admission", "She arrived at night, barefoot, and asked for her mirror."),
    ("Night Log", "At three the ward was quiet.\nAt four she was standing at the window, waving."),
    ("Last Entry", "The bed was made. Nobody had seen her leave."),
)


def patient(**overrides: Any) -> pb.Patient:
    fields: dict[str, Any] = {
        "name": "Edith Crane",
        "age": 41,
        "diagnosis": "Somnambulism",
        "appearance": "Pale, hollow-eyed, with wet hair",
        "gender": pb.GENDER_FEMALE,
        "admission_date": "1894-03-12",
    }
    return pb.Patient(**{**fields, **overrides})


def chapters(count: int = len(CHAPTERS)) -> list[pb.Chapter]:
    return [pb.Chapter(title=f"{CHAPTERS[i % 3][0]} {i + 1}", text=CHAPTERS[i % 3][1]) for i in range(count)]


def case_file(**overrides: Any) -> pb.StoryContent:
    fields: dict[str, Any] = {
        "title": "Ward Nine",
        "patient": patient(),
        "chapters": chapters(),
        "image_generation_prompt": "A pale woman with wet hair in a dim hospital ward, 1890s photograph",
    }
    return pb.StoryContent(**{**fields, **overrides})

"""What every writer must hand back: one case file as a JSON object, and the check it passes.

The model writers send STORY_SCHEMA (where the endpoint takes a schema) and INSTRUCTIONS,
then run each reply through read_story; the local writer's stories pass the same check in
the tests. A StoryJsonError says what is wrong in words a model can act on, because it is
sent back to the model in the follow-up turn.
"""

from __future__ import annotations

import datetime
import json
import re
import unicodedata
from typing import Any

from services.story import model
from services.story.model import MAX_AGE, MAX_CHAPTERS, MIN_AGE, MIN_CHAPTERS
from shared.validation import text_problem

# The limits are the story model's own (the ones CreateStory content meets), so a story
# that passes here is never refused by the domain.
GENDERS = tuple(gender.value for gender in model.Gender)
MAX_CHARS = {
    "title": model.MAX_TITLE_CHARS,
    "patient.name": model.MAX_NAME_CHARS,
    "patient.diagnosis": model.MAX_DIAGNOSIS_CHARS,
    "patient.appearance": model.MAX_APPEARANCE_CHARS,
    "chapter.title": model.MAX_CHAPTER_TITLE_CHARS,
    "chapter.text": model.MAX_CHAPTER_TEXT_CHARS,
    "image_generation_prompt": model.MAX_IMAGE_PROMPT_CHARS,
}
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# Typographic characters models like to use, with what a keyboard has instead.
_PLAIN_PUNCTUATION = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-",
        "\u2026": "...", "\u00a0": " ", "\u202f": " ", "\r": "",
    }
)  # fmt: skip

_STRING = {"type": "string"}
STORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "patient", "chapters", "image_generation_prompt"],
    "properties": {
        "title": _STRING,
        "patient": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "age", "gender", "admission_date", "diagnosis", "appearance"],
            "properties": {
                "name": _STRING,
                "age": {"type": "integer", "minimum": MIN_AGE, "maximum": MAX_AGE},
                "gender": {"type": "string", "enum": list(GENDERS)},
                "admission_date": {"type": "string", "description": "ISO date, YYYY-MM-DD"},
                "diagnosis": _STRING,
                "appearance": _STRING,
            },
        },
        "chapters": {
            "type": "array",
            "minItems": MIN_CHAPTERS,
            "maxItems": MAX_CHAPTERS,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["title", "text"],
                "properties": {"title": _STRING, "text": _STRING},
            },
        },
        "image_generation_prompt": _STRING,
    },
}

INSTRUCTIONS = f"""\
You write short horror stories for a typing game: each is the case file of one patient of \
an old lunatic asylum, told through admission notes, ward journals, letters, interview \
transcripts and the last entry. Players type the titles and chapters, so use plain ASCII \
letters, digits and simple punctuation only (no curly quotes, no long dashes, no accents), \
and no markdown, HTML or other markup.

Reply with one JSON object and nothing else, in exactly this shape:
{{"title": "...",
 "patient": {{"name": "...", "age": 42, "gender": "female", "admission_date": "1894-03-12", \
"diagnosis": "...", "appearance": "..."}},
 "chapters": [{{"title": "...", "text": "..."}}, ...],
 "image_generation_prompt": "..."}}

Rules: {MIN_CHAPTERS} to {MAX_CHAPTERS} chapters; each chapter text is two to four paragraphs \
separated by a blank line, 80 to 300 words; age is a whole number from {MIN_AGE} to {MAX_AGE}; \
gender is one of {", ".join(GENDERS)}; admission_date is the day of admission as YYYY-MM-DD; \
image_generation_prompt describes a portrait of the patient (face, clothes, setting, light, \
mood, photographic style of the era) for an image model in one to three vivid sentences, \
with no text or lettering in the picture."""


class StoryJsonError(ValueError):
    """The reply is not a usable case file; the message says what to fix."""


def read_story(text: str) -> dict[str, Any]:
    """The checked, plain-ASCII case file in a model's reply."""
    return check_story(parse_story(text))


def parse_story(text: str) -> Any:
    """Reads the JSON object out of the model's text, tolerating a ```json fence, chatter, or
    the <think> block that reasoning models on local servers put first."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    candidate = fenced.group(1) if fenced else text
    start, end = candidate.find("{"), candidate.rfind("}")
    if start < 0 or end < start:
        raise StoryJsonError("the reply holds no JSON object")
    try:
        return json.loads(candidate[start : end + 1])
    except json.JSONDecodeError as error:
        raise StoryJsonError(f"the JSON does not parse: {error.msg} at character {error.pos}") from None


def check_story(draft: Any) -> dict[str, Any]:
    """A clean copy of `draft`, or StoryJsonError naming the first field that is wrong."""
    story = _object(draft, "the reply", ("title", "patient", "chapters", "image_generation_prompt"))
    patient = _object(
        story["patient"], "patient", ("name", "age", "gender", "admission_date", "diagnosis", "appearance")
    )
    chapters = story["chapters"]
    if not isinstance(chapters, list) or not MIN_CHAPTERS <= len(chapters) <= MAX_CHAPTERS:
        count = f"{len(chapters)} were given" if isinstance(chapters, list) else "it is not a list"
        raise StoryJsonError(f"chapters: must be a list of {MIN_CHAPTERS} to {MAX_CHAPTERS} chapters; {count}")
    return {
        "title": _typeable(story["title"], "title", MAX_CHARS["title"]),
        "patient": {
            "name": _text(patient["name"], "patient.name", MAX_CHARS["patient.name"]),
            "age": _age(patient["age"]),
            "gender": _gender(patient["gender"]),
            "admission_date": _admission_date(patient["admission_date"]),
            "diagnosis": _text(patient["diagnosis"], "patient.diagnosis", MAX_CHARS["patient.diagnosis"]),
            "appearance": _text(patient["appearance"], "patient.appearance", MAX_CHARS["patient.appearance"]),
        },
        "chapters": [_chapter(chapter, f"chapters[{index}]") for index, chapter in enumerate(chapters)],
        "image_generation_prompt": _text(
            story["image_generation_prompt"], "image_generation_prompt", MAX_CHARS["image_generation_prompt"]
        ),
    }


def plain_ascii(text: str) -> str:
    """Typographic quotes, dashes and accents become what a keyboard types ("Zoë" -> "Zoe")."""
    text = unicodedata.normalize("NFKD", text.translate(_PLAIN_PUNCTUATION))
    return "".join(char for char in text if not unicodedata.combining(char))


def typeable_phrase(text: str) -> str:
    """`text` reduced to typeable characters, on one line: for a caller's theme in a story."""
    text = plain_ascii(text)
    kept = "".join(" " if char.isspace() else char for char in text if char.isspace() or char in model.TYPEABLE_CHARS)
    return " ".join(kept.split())


def _object(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StoryJsonError(f"{where}: must be a JSON object")
    missing = [key for key in keys if key not in value]
    if missing:
        raise StoryJsonError(f"{where}: lacks {', '.join(missing)}")
    return value


def _chapter(value: Any, where: str) -> dict[str, str]:
    chapter = _object(value, where, ("title", "text"))
    return {
        "title": _typeable(chapter["title"], f"{where}.title", MAX_CHARS["chapter.title"]),
        "text": _typeable(chapter["text"], f"{where}.text", MAX_CHARS["chapter.text"], newlines=True),
    }


def _text(value: Any, where: str, max_chars: int, *, newlines: bool = False) -> str:
    if not isinstance(value, str):
        raise StoryJsonError(f"{where}: must be a string")
    text = plain_ascii(value).strip()
    problem = text_problem(text, max_chars=max_chars, allowed_controls="\n" if newlines else "")
    if problem is None and not text.isascii():
        problem = "must be plain ASCII"
    if problem is not None:
        raise StoryJsonError(f"{where}: {problem}")
    return text


def _typeable(value: Any, where: str, max_chars: int, *, newlines: bool = False) -> str:
    text = _text(value, where, max_chars, newlines=newlines)
    odd = model.untypeable_chars(text, newlines=newlines)
    if odd:
        raise StoryJsonError(f"{where}: must be plain prose without markup; remove {' '.join(odd)}")
    return text


def _age(value: Any) -> int:
    # JSON true is a Python int; an age of "True" is not an age.
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_AGE <= value <= MAX_AGE:
        raise StoryJsonError(f"patient.age: must be a whole number from {MIN_AGE} to {MAX_AGE}")
    return value


def _gender(value: Any) -> str:
    gender = value.strip().lower() if isinstance(value, str) else value
    if gender not in GENDERS:
        raise StoryJsonError(f"patient.gender: must be one of {', '.join(GENDERS)}")
    return gender


def _admission_date(value: Any) -> str:
    text = value.strip() if isinstance(value, str) else ""
    earliest, latest = model.EARLIEST_ADMISSION, model.LATEST_ADMISSION
    try:
        if not _ISO_DATE.fullmatch(text):
            raise ValueError
        admitted = datetime.date.fromisoformat(text)
    except ValueError:
        raise StoryJsonError("patient.admission_date: must be a real date written YYYY-MM-DD") from None
    if not earliest <= admitted <= latest:
        raise StoryJsonError(f"patient.admission_date: must be from {earliest.isoformat()} to {latest.isoformat()}")
    return admitted.isoformat()

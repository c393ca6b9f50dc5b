"""The local writer (shape, determinism, and variety measured over a hundred stories) and the
writer factory."""

from __future__ import annotations

import collections
import itertools
import json
import re
import statistics

import pytest

from services.story.domain import content_from_writer
from services.story.writers import AnthropicWriter, LocalWriter, OpenAIWriter, build_writer
from services.story.writers.local import DIAGNOSES, WARDS
from services.story.model import MAX_CHAPTERS, MIN_CHAPTERS, untypeable_chars
from services.story.writers.story_json import check_story

pytestmark = pytest.mark.timeout(20)


async def hundred_stories(theme: str | None = None) -> list[dict]:
    writer = LocalWriter()
    return [await writer.write(theme=theme, seed=f"user-7\x00request-{index}") for index in range(100)]


def shingles(text: str, size: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[index : index + size]) for index in range(len(words) - size + 1)}


def jaccard(texts: list[str]) -> list[float]:
    sets = [shingles(text) for text in texts]
    return [len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)]


def full_text(story: dict) -> str:
    return "\n\n".join(chapter["text"] for chapter in story["chapters"])


async def test_the_same_request_gives_the_same_story_and_another_a_different_one():
    first = await LocalWriter().write(theme="drowning", seed="u1\x00r1")
    assert first == await LocalWriter().write(theme="drowning", seed="u1\x00r1")
    assert first != await LocalWriter().write(theme="drowning", seed="u2\x00r1")
    assert first != await LocalWriter().write(theme="drowning", seed="u1\x00r2")
    assert first != await LocalWriter().write(theme="fire", seed="u1\x00r1")


async def test_a_hundred_stories_are_a_hundred_different_patients():
    patients = [story["patient"] for story in await hundred_stories()]

    assert len({patient["name"] for patient in patients}) >= 95
    assert len({patient["age"] for patient in patients}) >= 40
    genders = collections.Counter(patient["gender"] for patient in patients)
    assert set(genders) == {"female", "male"} and min(genders.values()) >= 30
    assert len({patient["diagnosis"] for patient in patients}) >= 25
    assert len({patient["appearance"] for patient in patients}) == 100
    dates = [patient["admission_date"] for patient in patients]
    assert len(set(dates)) >= 95
    years = [int(date[:4]) for date in dates]
    assert len({year // 10 for year in years}) >= 9 and max(years) - min(years) >= 80


async def test_a_hundred_stories_are_a_hundred_different_case_files():
    stories = await hundred_stories()

    counts = collections.Counter(len(story["chapters"]) for story in stories)
    assert set(counts) == set(range(MIN_CHAPTERS, MAX_CHAPTERS + 1)) and min(counts.values()) >= 8
    assert len({tuple(chapter["title"] for chapter in story["chapters"]) for story in stories}) >= 95
    assert len({story["title"] for story in stories}) >= 85
    wards = {ward for story in stories for ward in WARDS if f" in {ward}," in story["image_generation_prompt"]}
    assert len(wards) >= 15
    # Word 4-shingles: two stories share little text, and no two read as the same file.
    similarities = jaccard([full_text(story) for story in stories])
    assert statistics.mean(similarities) < 0.10
    assert max(similarities) < 0.45


async def test_every_story_has_its_own_vivid_portrait_prompt():
    stories = await hundred_stories()
    prompts = [story["image_generation_prompt"] for story in stories]

    assert len(set(prompts)) == 100
    assert statistics.mean(jaccard(prompts)) < 0.25
    for story, prompt in zip(stories, prompts, strict=True):
        patient = story["patient"]
        assert patient["appearance"] in prompt and f"{patient['age']}-year-old" in prompt
        assert ("woman" if patient["gender"] == "female" else "man") in prompt
        assert "no text" in prompt and 200 < len(prompt) < 1000


async def test_every_story_passes_the_check_model_replies_get_and_the_domain_reads_it():
    for story in await hundred_stories(theme="the hum in the walls"):
        assert check_story(story) == story  # plain ASCII, typeable, every field in range
        content = content_from_writer(story)  # unknown keys (gender, admission_date) are ignored
        assert len(content.chapters) == len(story["chapters"])
        json.dumps(story)


async def test_chapters_are_plain_typeable_prose():
    for story in await hundred_stories():
        for chapter in story["chapters"]:
            assert not untypeable_chars(chapter["title"]) and not untypeable_chars(chapter["text"], newlines=True)
            assert "{" not in chapter["text"] and "}" not in chapter["text"]  # every slot was filled
            assert len(chapter["text"].split("\n\n")) >= 2
            assert 150 < len(chapter["text"]) < 2500


async def test_the_theme_is_used_and_made_typeable():
    story = await LocalWriter().write(theme="  the *hum* in the walls\n<b>caf\u00e9</b> ", seed="theme")
    text = full_text(story)
    assert "the hum in the walls bcafe/b" in text
    assert check_story(story) == story
    blank = await LocalWriter().write(theme="   ", seed="theme")
    assert blank == await LocalWriter().write(theme=None, seed="theme")


def test_build_writer_chooses_by_name_and_names_the_variable_to_fix():
    assert isinstance(build_writer("local", api_key=None, base_url=None), LocalWriter)
    anthropic = build_writer("Anthropic", api_key="sk-secret-value", base_url="http://127.0.0.1:9")
    assert isinstance(anthropic, AnthropicWriter) and anthropic.base_url == "http://127.0.0.1:9"
    assert build_writer("anthropic", api_key="k", base_url=None).base_url == "https://api.anthropic.com"
    assert isinstance(build_writer("openai", api_key="k", base_url="http://127.0.0.1:9/v1"), OpenAIWriter)
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        build_writer("anthropic", api_key=None, base_url=None)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        build_writer("openai", api_key="", base_url=None)
    with pytest.raises(ValueError, match="STORY_WRITER"):
        build_writer("gpt", api_key="k", base_url=None)


def test_every_writer_names_its_model():
    assert LocalWriter().model
    assert OpenAIWriter("k", model="m").model == "m"
    assert AnthropicWriter("k", model="c").model == "c"


def test_the_word_lists_hold_no_duplicates():
    assert len(set(DIAGNOSES)) == len(DIAGNOSES) and len(set(WARDS)) == len(WARDS)

"""The local writer, the writer factory and the JSON extraction used by the Anthropic writer."""

from __future__ import annotations

import json

import pytest

from services.story.writers import AnthropicWriter, LocalWriter, WriterError, build_writer
from services.story.writers.anthropic import parse_story

pytestmark = pytest.mark.timeout(10)


async def test_local_writer_is_deterministic_for_a_seed_and_theme():
    writer = LocalWriter()
    first = await writer.write(theme="drowning", seed="seed-1")
    again = await LocalWriter().write(theme="drowning", seed="seed-1")
    assert first == again


async def test_local_writer_differs_across_seeds_and_themes():
    writer = LocalWriter()
    stories = [await writer.write(theme=None, seed=f"seed-{index}") for index in range(40)]
    assert len({json.dumps(story, sort_keys=True) for story in stories}) == 40
    assert len({story["patient"]["name"] for story in stories}) >= 15
    assert len({story["patient"]["diagnosis"] for story in stories}) >= 6
    assert len({story["title"] for story in stories}) >= 20
    assert await writer.write(theme="mirrors", seed="x") != await writer.write(theme="fire", seed="x")


async def test_local_story_has_the_shape_the_story_domain_expects():
    story = await LocalWriter().write(theme="the hum in the walls", seed="shape")
    assert set(story) == {"title", "patient", "chapters", "image_generation_prompt"}
    assert set(story["patient"]) == {"name", "age", "diagnosis", "appearance"}
    assert isinstance(story["patient"]["age"], int) and 17 <= story["patient"]["age"] <= 80
    for key in ("name", "diagnosis", "appearance"):
        assert isinstance(story["patient"][key], str) and story["patient"][key].strip()
    assert len(story["chapters"]) == 3
    for chapter in story["chapters"]:
        assert set(chapter) == {"title", "text"}
        assert chapter["title"].strip()
        assert len(chapter["text"].split("\n\n")) >= 2
        assert len(chapter["text"]) > 200
    assert story["patient"]["appearance"] in story["image_generation_prompt"]
    json.dumps(story)  # a plain JSON object, nothing the story service cannot serialise


async def test_local_story_uses_the_theme_and_stays_typeable():
    story = await LocalWriter().write(theme="the hum in the walls", seed="ascii")
    text = "\n".join(chapter["text"] for chapter in story["chapters"])
    assert "the hum in the walls" in text
    assert "{" not in text and "}" not in text  # every template slot was filled
    for value in (story["title"], text, story["image_generation_prompt"]):
        assert value.isascii()


async def test_local_story_ignores_surrounding_whitespace_of_empty_theme():
    story = await LocalWriter().write(theme="   ", seed="blank")
    assert all(chapter["text"].strip() for chapter in story["chapters"])


def test_build_writer_local_and_anthropic():
    assert isinstance(build_writer("local", api_key=None, base_url=None), LocalWriter)
    writer = build_writer("Anthropic", api_key="sk-secret-value", base_url="http://127.0.0.1:9")
    assert isinstance(writer, AnthropicWriter)
    assert writer.base_url == "http://127.0.0.1:9"
    assert build_writer("anthropic", api_key="k", base_url=None).base_url == "https://api.anthropic.com"


def test_build_writer_names_the_variable_to_fix():
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        build_writer("anthropic", api_key=None, base_url=None)
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        build_writer("anthropic", api_key="", base_url=None)
    with pytest.raises(ValueError, match="STORY_WRITER"):
        build_writer("gpt", api_key="k", base_url=None)


def test_anthropic_writer_repr_hides_the_key():
    writer = AnthropicWriter("sk-ant-very-secret")
    assert "sk-ant-very-secret" not in repr(writer)
    assert "sk-ant-very-secret" not in str(vars(writer).keys())


@pytest.mark.parametrize(
    "text",
    [
        '{"title": "T", "chapters": []}',
        '```json\n{"title": "T", "chapters": []}\n```',
        'Here is your case file:\n```\n{"title": "T", "chapters": []}\n```\nEnjoy.',
        'Sure! {"title": "T", "chapters": []} Hope it scares.',
    ],
)
def test_parse_story_tolerates_fences_and_chatter(text):
    assert parse_story(text) == {"title": "T", "chapters": []}


@pytest.mark.parametrize("text", ["", "No JSON here.", '{"title": "T",', "[1, 2, 3]", "```json\n[1]\n```"])
def test_parse_story_rejects_what_is_not_a_json_object(text):
    with pytest.raises(WriterError) as raised:
        parse_story(text)
    assert raised.value.transient is False


def test_writer_error_reason_is_short():
    error = WriterError("x" * 5000, transient=True, retry_after=3)
    assert len(error.reason) <= 200
    assert error.transient and error.retry_after == 3

"""The check every writer's story passes: what it accepts, cleans and refuses, and that its
messages name the field (they go back to the model in the follow-up turn)."""

from __future__ import annotations

import copy
import json

import pytest

from services.story.writers.story_json import StoryJsonError, check_story, parse_story, plain_ascii, read_story
from tests.fakes.chat_model import SAMPLE_STORY


def story_with(path: str, value) -> dict:
    story = copy.deepcopy(SAMPLE_STORY)
    *parents, last = path.split(".")
    target = story
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return story


@pytest.mark.parametrize(
    "text",
    [
        '{"title": "T", "chapters": []}',
        '```json\n{"title": "T", "chapters": []}\n```',
        'Here is your case file:\n```\n{"title": "T", "chapters": []}\n```\nEnjoy.',
        'Sure! {"title": "T", "chapters": []} Hope it scares.',
        '<think>maybe {"no": 1}</think>{"title": "T", "chapters": []}',
    ],
)
def test_parse_tolerates_fences_chatter_and_think_blocks(text):
    assert parse_story(text) == {"title": "T", "chapters": []}


@pytest.mark.parametrize("text", ["", "No JSON here.", '{"title": "T",', "[1, 2, 3]", "```json\n[1]\n```"])
def test_parse_or_check_refuses_what_is_not_a_json_object(text):
    with pytest.raises(StoryJsonError):
        read_story(text)


def test_a_good_story_comes_back_unchanged():
    assert read_story(json.dumps(SAMPLE_STORY)) == SAMPLE_STORY


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("title", KeyError, "the reply: lacks title"),
        ("patient.gender", KeyError, "patient: lacks gender"),
        ("patient.age", 131, "patient.age: must be a whole number from 0 to 130"),
            ("patient.admission_date", "1799-12-31", "patient.admission_date: must be from 1800-01-01 to 2100-12-31"),
        ("patient.age", "34", "patient.age"),
        ("patient.age", True, "patient.age"),
        ("patient.age", 34.5, "patient.age"),
        ("patient.gender", "woman", "patient.gender: must be one of female, male, other"),
        ("patient.admission_date", "12/03/1894", "patient.admission_date"),
        ("patient.admission_date", "1894-02-30", "patient.admission_date"),
        ("patient.admission_date", 18940312, "patient.admission_date"),
        ("patient.name", "", "patient.name: must not be empty"),
        ("patient.name", "A\x00B", "patient.name: must not contain control characters"),
        ("patient.diagnosis", "x" * 501, "patient.diagnosis: must be at most 500 characters"),
        ("chapters", [], "chapters: must be a list of 3 to 7 chapters; 0 were given"),
        ("chapters", "three", "it is not a list"),
        ("chapters.1", "text", "chapters[1]: must be a JSON object"),
        ("chapters.1.text", KeyError, "chapters[1]: lacks text"),
        ("chapters.2.text", "She <b>screamed</b>.", "chapters[2].text: must be plain prose without markup; remove < >"),
        ("chapters.0.title", "# Admission", "chapters[0].title: must be plain prose"),
        ("chapters.0.text", "\u4e00\u4e8c", "chapters[0].text: must be plain ASCII"),
        ("image_generation_prompt", "  ", "image_generation_prompt: must not be empty"),
    ],
)
def test_each_problem_is_named_by_its_field(path, value, message):
    with pytest.raises(StoryJsonError) as raised:
        check_story(story_with(path, value))
    assert message in str(raised.value)


def test_seven_chapters_pass_and_eight_do_not():
    chapter = SAMPLE_STORY["chapters"][0]
    assert len(check_story(story_with("chapters", [chapter] * 7))["chapters"]) == 7
    with pytest.raises(StoryJsonError, match="8 were given"):
        check_story(story_with("chapters", [chapter] * 8))


def test_typographic_text_is_made_typeable_and_extra_keys_are_dropped():
    story = story_with("chapters.0.text", "\u201cNo,\u201d she said \u2014 it\u2019s late\u2026\r\n\r\nCaf\u00e9.")
    story["mood"] = "grim"
    story["patient"]["gender"] = " Female "
    checked = check_story(story)
    assert checked["chapters"][0]["text"] == '"No," she said - it\'s late...\n\nCafe.'
    assert checked["patient"]["gender"] == "female"
    assert "mood" not in checked
    assert plain_ascii("Zo\u00eb Br\u00fcckner") == "Zoe Bruckner"

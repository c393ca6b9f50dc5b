"""handlers.StoryProtos: a story's proto built once per Story object, never shared out."""

import dataclasses
import datetime

from casefile.story.v1 import story_service_pb2 as pb
from services.story import domain
from services.story.handlers import StoryProtos, story_to_proto

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def a_story(story_id: str = "00000000-0000-0000-0000-000000000001") -> domain.Story:
    patient = domain.Patient(name="Ada", age=40, diagnosis="insomnia", appearance="pale", gender=domain.Gender.FEMALE)
    content = domain.StoryContent(
        title="Ward", patient=patient, chapters=(domain.Chapter("One", "Night."),), image_generation_prompt="a ward"
    )
    return domain.Story(
        story_id=story_id, user_id="u1", content=content, storage_id="", portrait_status=domain.PortraitStatus.PENDING,
        portrait_error="", portrait_attempt=1, create_time=NOW, update_time=NOW,
    )  # fmt: skip


def test_the_same_story_gets_the_proto_built_once():
    protos = StoryProtos()
    story = a_story()
    assert protos.of(story) is protos.of(story)
    assert protos.of(story) == story_to_proto(story)


def test_another_story_object_gets_its_own_proto_even_when_equal():
    protos = StoryProtos()
    story = a_story()
    changed = dataclasses.replace(story, storage_id="portraits/1.png", portrait_status=domain.PortraitStatus.READY)
    assert protos.of(changed).storage_id == "portraits/1.png"
    assert protos.of(story).storage_id == ""
    assert protos.of(dataclasses.replace(story)) is not protos.of(story)


def test_a_response_holds_a_copy_of_the_kept_proto():
    protos = StoryProtos()
    story = a_story()
    response = pb.GetStoryResponse(story=protos.of(story))
    response.story.title = "changed by a caller"
    assert protos.of(story).title == "Ward"


def test_at_most_max_stories_are_kept():
    protos = StoryProtos(max_stories=2)
    stories = [a_story(f"00000000-0000-0000-0000-00000000000{n}") for n in range(3)]
    first = protos.of(stories[0])
    for story in stories[1:]:
        protos.of(story)
    assert protos.of(stories[0]) is not first  # dropped, so built again
    assert protos.of(stories[0]) == first

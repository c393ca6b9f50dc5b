"""The `story.created` event as it is stored in the outbox and published on JetStream."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from casefile.story.v1 import story_events_pb2
from services.story.model import Story
from shared.streams import STORY_CREATED_SUBJECT


def story_created_msg_id(story_id: str, attempt: int) -> str:
    """Nats-Msg-Id: one event per portrait attempt, however often it is published."""
    return f"{STORY_CREATED_SUBJECT}:{story_id}:{attempt}"


def encode_story_created(story: Story) -> bytes:
    create_time = Timestamp()
    create_time.FromDatetime(story.create_time)
    return story_events_pb2.StoryCreated(
        story_id=story.story_id,
        user_id=story.user_id,
        image_generation_prompt=story.content.image_generation_prompt,
        create_time=create_time,
        portrait_attempt=story.portrait_attempt,
    ).SerializeToString()

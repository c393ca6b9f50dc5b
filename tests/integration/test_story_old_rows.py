"""Stories written before the richer case files (migration 0003) still read back.

The database is migrated only as far as the old code knew (0001, 0002), a story is written
the way that code wrote it, and then the current service starts on it: it applies 0003
itself and serves the old row next to new ones.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import asyncpg
import grpc
import pytest

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story.difficulty import story_typing_difficulty
from services.story.main import MIGRATIONS, build
from services.story.model import Chapter
from shared.auth import bearer_metadata
from tests.case_files import case_file
from tests.integration.old_schema import database_migrated_up_to
from tests.integration.test_story_service import story_config

GATEWAY = bearer_metadata("t-gateway")
IMAGE = bearer_metadata("t-image")
OLD_MIGRATIONS = ("0001_stories.sql", "0002_outbox_relay_and_change_feed.sql")
OLD_CHAPTERS = [
    {"title": "Admission", "text": "She arrived at night.\tNobody knew her."},  # a tab: allowed back then
    {"title": "The Last Entry \u2014 1894", "text": "Gone."},
]


@pytest.fixture
def old_database(postgres_admin_dsn, tmp_path):
    """A database whose story schema is as the code before 0003 left it."""
    with database_migrated_up_to(postgres_admin_dsn, tmp_path, "story", MIGRATIONS, OLD_MIGRATIONS) as dsn:
        yield dsn


async def write_old_story(dsn: str) -> str:
    """The INSERT of the story service before 0003: four patient keys, no new columns."""
    story_id = str(uuid.uuid4())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO story.stories (story_id, user_id, request_id, title, patient, chapters, image_generation_prompt)
               VALUES ($1, 'u-old', NULL, 'Ward Nine', $2, $3, 'a pale woman')""",
            story_id,
            json.dumps({"name": "Edith Crane", "age": 41, "diagnosis": "Somnambulism", "appearance": "Pale"}),
            json.dumps(OLD_CHAPTERS),
        )
    finally:
        await conn.close()
    return story_id


async def test_an_old_story_reads_back_next_to_new_ones(old_database, nats_server):
    old_id = await write_old_story(old_database)
    async with contextlib.AsyncExitStack() as stack:
        server = await build(story_config(old_database, nats_server.url), stack)  # applies 0003
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        stack.push_async_callback(channel.close)
        stub = story_service_pb2_grpc.StoryServiceStub(channel)

        old = (await stub.GetStory(pb.GetStoryRequest(story_id=old_id), metadata=GATEWAY)).story
        new = (await stub.CreateStory(pb.CreateStoryRequest(user_id="u-old", content=case_file()), metadata=GATEWAY)).story
        listed = (await stub.ListStories(pb.ListStoriesRequest(user_id="u-old"), metadata=GATEWAY)).stories
        ready = (
            await stub.SetStoryImage(
                pb.SetStoryImageRequest(story_id=old_id, storage_id=f"portraits/{old_id}/1.png", attempt=1),
                metadata=IMAGE,
            )
        ).story

    assert (old.title, old.patient.name, old.patient.age) == ("Ward Nine", "Edith Crane", 41)
    assert [(c.title, c.text) for c in old.chapters] == [(c["title"], c["text"]) for c in OLD_CHAPTERS]
    assert (old.patient.gender, old.patient.admission_date) == (pb.GENDER_UNSPECIFIED, "")
    assert (old.theme, old.writer, old.writer_model) == ("", "", "")
    # Never stored, so computed from the text when read (the em dash counts as a rare character).
    assert old.typing_difficulty == story_typing_difficulty(old.title, [Chapter(**c) for c in OLD_CHAPTERS]) > 0
    assert [story.story_id for story in listed] == [new.story_id, old_id]
    assert listed[1] == old
    assert ready.portrait_status == pb.PORTRAIT_STATUS_READY
    assert ready.patient == old.patient and ready.typing_difficulty == old.typing_difficulty

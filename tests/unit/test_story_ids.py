"""validate_story_id: the canonical spelling passes as it is, every other UUID spelling is
turned into it, and anything else is refused by name."""

import uuid

import pytest

from services.story.domain import InvalidField, validate_story_id

STORY_ID = "c6678d19-6c98-42bb-a204-87142d64f69c"


@pytest.mark.parametrize(
    "spelling", [STORY_ID, STORY_ID.upper(), "{" + STORY_ID + "}", STORY_ID.replace("-", ""), "urn:uuid:" + STORY_ID]
)
def test_every_uuid_spelling_becomes_the_canonical_one(spelling):
    assert validate_story_id(spelling) == STORY_ID == str(uuid.UUID(spelling))


@pytest.mark.parametrize("bad", ["nope", STORY_ID + "\n", STORY_ID[:-1] + "g", STORY_ID + "0", " " + STORY_ID, "x" * 65])
def test_anything_else_is_refused(bad):
    with pytest.raises(InvalidField, match="story_id: must be a UUID"):
        validate_story_id(bad)

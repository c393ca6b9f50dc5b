"""Which earlier turns of an edit chain go to the provider (services/image/jobs/edits.py):
the nearest ones that delivered a picture, within the byte budget, oldest first, each with
the picture it started from only when the conversation has not shown it already."""

from __future__ import annotations

import uuid

from services.image.jobs import edits, storage
from services.image.jobs.storage import ChainTurn, StoredImage


def _image(name: str) -> StoredImage:
    return StoredImage(uuid.uuid5(uuid.NAMESPACE_URL, name), uuid.uuid4(), f"key/{name}", 64, 64)


class Store:
    """What the database and S3 would answer: images by id, objects by key."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.images = {_image(name).image_id: _image(name) for name in objects}

    async def read(self, query, *args):
        assert query is storage.user_image
        return self.images.get(args[0])

    async def fetch(self, key: str) -> bytes | None:
        return self.objects.get(key.removeprefix("key/"))


def _turn(prompt: str, result: str | None, source: str | None = None) -> ChainTurn:
    return ChainTurn(uuid.uuid4(), prompt, "EDIT" if source else "GENERATE",
                     _image(source).image_id if source else None, _image(result) if result else None)  # fmt: skip


async def test_each_turn_brings_its_picture_and_only_a_source_not_shown_yet():
    store = Store({"upload": b"U" * 10, "one": b"1" * 10, "two": b"2" * 10})
    turns = [_turn("first", "one", source="upload"), _turn("second", "two", source="one")]

    history = await edits._history(turns, "u1", store.read, store.fetch, budget=1000)

    assert [(turn.prompt, turn.result.data, turn.source.data if turn.source else None) for turn in history] == [
        ("first", b"1" * 10, b"U" * 10),  # its source was never in the conversation
        ("second", b"2" * 10, None),  # it edited the turn before: already shown
    ]


async def test_turns_without_a_picture_are_left_out_and_the_oldest_go_past_the_budget():
    store = Store({"one": b"1" * 40, "three": b"3" * 40, "four": b"4" * 40})
    turns = [_turn("first", "one"), _turn("second", None), _turn("third", "three"), _turn("gone", "deleted"),
             _turn("fourth", "four")]  # fmt: skip

    history = await edits._history(turns, "u1", store.read, store.fetch, budget=100)

    assert [turn.prompt for turn in history] == ["third", "fourth"]


def test_a_chain_is_refused_past_fifty_deep():
    root = uuid.uuid4()

    def parent_at(depth: int):
        return storage.JobRow(**{**_row_fields(), "job_id": uuid.uuid4(), "root_job_id": root, "chain_depth": depth})

    assert edits.lineage_under(parent_at(49), uuid.uuid4()) == edits.Lineage(root, 50)
    assert isinstance(edits.lineage_under(parent_at(50), uuid.uuid4()), str)
    lone = uuid.uuid4()
    assert edits.lineage_under(None, lone) == edits.Lineage(lone, 0)


def _row_fields() -> dict:
    return {field: None for field in storage.JobRow.__dataclass_fields__}

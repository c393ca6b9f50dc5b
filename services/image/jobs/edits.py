"""The image editor's jobs: the rules of an EDIT request and of a chain, and the inputs a
worker hands the provider. No grpc, no SQL text, no HTTP here.

An EDIT job changes a source image (an image_id of the user's, or, when it names a
parent_job_id and no source, the parent's first image) with one operation; INPAINT may
bring a mask. Jobs chain by parent_job_id: a job with no parent is the root of its chain
(root_job_id is its own id, chain_depth 0), each child is one deeper, at most
MAX_CHAIN_DEPTH. ListGenerationJobs(root_job_id=...) lists a whole chain.

A multi-turn edit sends the chain's earlier turns to providers that hold a conversation:
Gemini gets them as contents (user: the prompt and the picture it started from; model: the
picture it made), GPT Image edits the previous turn's result (the source by default).
Only the nearest MAX_HISTORY_TURNS turns whose pictures fit in MAX_HISTORY_BYTES go:
Gemini takes at most 20 MB of inline data in one request.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.image.catalog import EditOperation, ModelSpec
from services.image.jobs import storage
from services.image.jobs.storage import ChainTurn, JobRow, StoredImage
from services.image.providers.base import EditInstructions, EditTurn, ImageInput, InvalidRequest
from services.image.providers.pictures import MAX_MASK_BYTES

MAX_CHAIN_DEPTH = 50
MAX_HISTORY_TURNS = 4
MAX_HISTORY_BYTES = 12 * 1024 * 1024
# Operations whose meaning needs no words: the prompt may be left empty.
OPERATIONS_WITHOUT_PROMPT = frozenset({EditOperation.VARIATION, EditOperation.REMOVE_BACKGROUND})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Problems = list[tuple[str, str]]


def edit_field_problems(
    *, source_image_id: str, operation: EditOperation | None, mask: bytes, parent_job_id: str
) -> Problems:
    """What an EDIT request gets wrong on its face (the source and the mask's pixels are
    checked against the database after, still before the charge)."""
    problems: Problems = []
    if operation is None:
        problems.append(("edit_operation", "required for EDIT jobs"))
    if not source_image_id and not parent_job_id:
        problems.append(("source_image_id", "required for EDIT jobs (or a parent_job_id whose image the edit continues)"))
    elif source_image_id and not _is_uuid(source_image_id):
        problems.append(("source_image_id", "must be an image_id (a UUID)"))
    if mask:
        if operation is not None and operation is not EditOperation.INPAINT:
            problems.append(("mask", "only INPAINT takes a mask"))
        elif len(mask) > MAX_MASK_BYTES:
            problems.append(("mask", f"must be at most {MAX_MASK_BYTES} bytes"))
        elif not mask.startswith(_PNG_MAGIC):
            problems.append(("mask", "must be a PNG"))
    return problems


def source_problem(spec: ModelSpec, source: StoredImage) -> str | None:
    """Whether the model can start from this source (dall-e-2 edits only square pictures)."""
    if spec.square_edit_sources and source.width != source.height:
        return f"{spec.id} edits square images only; this one is {source.width}x{source.height}"
    return None


@dataclass(frozen=True)
class Lineage:
    """Where a new job sits in its chain."""

    root_job_id: uuid.UUID | None  # None: the job is its own root
    chain_depth: int


def lineage_under(parent: JobRow | None, job_id: uuid.UUID) -> Lineage | str:
    """The new job's place under `parent`, or why it cannot go there."""
    if parent is None:
        return Lineage(job_id, 0)
    depth = parent.chain_depth + 1
    if depth > MAX_CHAIN_DEPTH:
        return f"the chain would be {depth} edits deep; at most {MAX_CHAIN_DEPTH}: start a new chain from its image"
    return Lineage(parent.root_job_id or parent.job_id, depth)


# ---------------------------------------------------------------- the worker's side

Read = Callable[..., Awaitable[Any]]  # (storage function, *args) -> its result, on a pooled connection
Fetch = Callable[[str], Awaitable[bytes | None]]  # S3 key -> the object, None when it is gone


async def edit_instructions(row: JobRow, read: Read, fetch: Fetch) -> EditInstructions:
    """The source (and mask, and earlier turns) of an EDIT job, from the database and S3.
    InvalidRequest (not refunded) when the player deleted the source before it ran."""
    assert row.edit_operation is not None and row.source_image_id is not None
    operation = EditOperation(row.edit_operation)
    source = await read(storage.user_image, row.source_image_id, row.user_id)
    data = await fetch(source.storage_id) if source is not None else None
    if source is None or data is None:
        raise InvalidRequest("source_image_id: the source image was deleted before the edit ran", provider="router")
    mask = await read(storage.job_mask, row.job_id) if operation is EditOperation.INPAINT else None
    turns = await read(storage.chain_turns, row.job_id, row.user_id, MAX_HISTORY_TURNS) if row.parent_job_id else []
    history = await _history(turns, row.user_id, read, fetch, budget=MAX_HISTORY_BYTES - len(data))
    return EditInstructions(operation, ImageInput(data), mask=mask or None, history=history)


async def _history(turns: list[ChainTurn], user_id: str, read: Read, fetch: Fetch, *, budget: int) -> tuple[EditTurn, ...]:
    """The turns that delivered a picture, newest kept first until the budget is spent; oldest first."""
    kept: list[EditTurn] = []
    for position in range(len(turns) - 1, -1, -1):
        turn = turns[position]
        result = await fetch(turn.result.storage_id) if turn.result is not None else None
        if result is None:
            continue  # it delivered nothing (or the player deleted it): nothing to show
        earlier = turns[position - 1].result if position > 0 else None
        source = None
        if turn.source_image_id is not None and (earlier is None or earlier.image_id != turn.source_image_id):
            # It started from a picture the conversation has not shown yet.
            stored = await read(storage.user_image, turn.source_image_id, user_id)
            source = await fetch(stored.storage_id) if stored is not None else None
        size = len(result) + len(source or b"")
        if size > budget:
            break
        budget -= size
        kept.append(EditTurn(turn.prompt, ImageInput(result), ImageInput(source) if source is not None else None))
    return tuple(reversed(kept))


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False

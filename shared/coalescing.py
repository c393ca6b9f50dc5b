"""Calls by key served by as few statements as possible, each still sent after its callers asked.

On a small machine every PostgreSQL round trip costs CPU that the client, the server and the
database backend share, and one statement for many calls costs little more than one of
them: one `WHERE id = ANY($1)` for many GetStory calls, one debit over `unnest(...)` for
many Charge calls. grpc.aio starts each call on a loop turn of its own, so calls seldom
meet in one turn; they meet while a statement is on its way: at most `max_in_flight`
batches run at once, and the callers that come meanwhile form the next batch, sent as soon
as one returns. An idle server sends a lone call's statement on the next loop turn.

Nothing is cached and no caller joins a statement already sent: each caller sees what was
committed before it asked, as a statement of its own would. Callers asking with equal keys
share one answer.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Answer = TypeVar("Answer")

Batch = dict  # key -> the futures of its callers, waiting for the batch


class Coalescer(Generic[Key, Answer]):
    """`await coalescer.ask(key)`: the batch's answer for the key, or None when it has none.

    `run_many` gets the distinct keys of one batch and answers for the keys it can; a key
    it leaves out is None for its callers only. What it raises reaches every caller of the
    batch, and only them.
    """

    def __init__(
        self, run_many: Callable[[list[Key]], Awaitable[Mapping[Key, Answer]]], *, max_in_flight: int = 1
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._run_many = run_many
        self._max_in_flight = max_in_flight
        # The batch new callers join, until its statement is sent.
        self._open: Batch[Key, list[asyncio.Future[Answer | None]]] | None = None
        self._open_has_task = False
        # Batches whose task is scheduled or running; strong references, as the loop keeps
        # only weak ones to its tasks.
        self._sending: set[asyncio.Task[None]] = set()

    async def ask(self, key: Key) -> Answer | None:
        if self._open is None:
            self._open = {}
            self._send_open_batch_if_allowed()
        answer: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._open.setdefault(key, []).append(answer)
        return await answer

    def _send_open_batch_if_allowed(self) -> None:
        if self._open is None or self._open_has_task or len(self._sending) >= self._max_in_flight:
            return
        # The task's first step runs on the loop's next turn, after whatever else the loop
        # started on this one: the batch stays open until then.
        batch = asyncio.get_running_loop().create_task(self._serve(self._open))
        self._open_has_task = True
        self._sending.add(batch)
        batch.add_done_callback(functools.partial(self._ended, self._open))

    async def _serve(self, waiting: Batch[Key, list[asyncio.Future[Answer | None]]]) -> None:
        self._close(waiting)
        try:
            answers_by_key = await self._run_many(list(waiting))
        except Exception as error:
            for answers in waiting.values():
                for answer in answers:
                    if not answer.done():
                        answer.set_exception(error)
            return
        for key, answers in waiting.items():
            found = answers_by_key.get(key)
            for answer in answers:
                if not answer.done():  # its caller may have given up (a deadline, a cancel)
                    answer.set_result(found)

    def _close(self, waiting: Batch[Key, list[asyncio.Future[Answer | None]]]) -> None:
        if self._open is waiting:
            self._open = None
            self._open_has_task = False

    def _ended(self, waiting: Batch[Key, list[asyncio.Future[Answer | None]]], batch: asyncio.Task[None]) -> None:
        self._sending.discard(batch)
        # A batch cancelled (at shutdown), even before its first step, cancels its callers
        # rather than leave them waiting, and takes no new ones.
        self._close(waiting)
        for answers in waiting.values():
            for answer in answers:
                answer.cancel()  # a no-op on an answered one
        self._send_open_batch_if_allowed()

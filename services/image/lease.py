"""Leases: one worker at a time on a unit of work, however many deliveries of it arrive.

A lease is a row (owner, until) that a pipeline's storage claims and renews; this module
keeps one alive while work runs and stops the work before the lease can lapse. Renewals
run every `renew_every` seconds, each bounded by that same interval; if none has
succeeded for long enough that the lease might have lapsed, the work is cancelled and
LeaseLost raised, so a worker never goes on once another may have taken over. Every write
a pipeline makes under a lease also names the owner (fencing), as a second guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.image.errors import LeaseLost

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 3


@dataclass(frozen=True)
class LeaseTiming:
    """A lease lasts `seconds` from its last renewal and is renewed every third of it."""

    seconds: float

    @property
    def renew_every(self) -> float:
        return self.seconds / RENEWALS_PER_LEASE

    @property
    def safe_for(self) -> float:
        # Stop one renewal interval before the lease could lapse: the clock of the database
        # and ours need not agree to the millisecond.
        return self.seconds - self.renew_every


@contextlib.asynccontextmanager
async def lease_kept(
    renew: Callable[[], Awaitable[bool]], timing: LeaseTiming, *, log_fields: dict | None = None
) -> AsyncIterator[None]:
    """Renews the lease while the body runs; LeaseLost if it is lost or may have lapsed."""
    body = asyncio.current_task()
    assert body is not None
    loop = asyncio.get_running_loop()
    fields = log_fields or {}
    lost = False

    async def keep() -> None:
        nonlocal lost
        renewed_at = loop.time()
        while True:
            await asyncio.sleep(timing.renew_every)
            still_ours = await _renew_once(renew, timing, fields)
            if still_ours:
                renewed_at = loop.time()
            if still_ours is False or loop.time() - renewed_at >= timing.safe_for:
                log.warning("lease.lost", extra={**fields, "renewed_seconds_ago": round(loop.time() - renewed_at, 3)})
                lost = True
                body.cancel()
                return

    keeper = asyncio.create_task(keep(), name="lease-keeper")
    try:
        yield
    except asyncio.CancelledError:
        if lost and body.uncancel() == 0:
            raise LeaseLost("the lease lapsed or was taken over") from None
        raise
    finally:
        # Stopped before the final write or release that follows, so no renewal races them.
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)


async def _renew_once(renew: Callable[[], Awaitable[bool]], timing: LeaseTiming, fields: dict) -> bool | None:
    """True: renewed. False: no longer ours. None: the renewal failed (try again)."""
    try:
        async with asyncio.timeout(timing.renew_every):
            return await renew()
    except Exception as error:
        log.warning("lease.renew_failed", extra={**fields, "error": repr(error)})
        return None


class BatchedRenewals:
    """Renews many leases with one statement per round instead of one per lease.

    Each lease's keeper calls `renew(key)` as usual (see lease_kept); calls that arrive
    within `window` seconds of each other are sent together to `renew_many(keys)`, which
    answers the keys still held. A thousand jobs in flight in one process then cost a
    few statements per renewal interval, and a renewal never waits in the pool's queue
    behind a thousand jobs' own statements (which would make leases look lost).
    """

    def __init__(self, renew_many: Callable[[list[Any]], Awaitable[set[Any]]], *, window: float = 0.2) -> None:
        self._renew_many = renew_many
        self._window = window
        self._waiting: dict[Any, asyncio.Future[bool]] = {}
        self._flush: asyncio.Task[None] | None = None

    async def renew(self, key: Any) -> bool:
        future = self._waiting.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[key] = future
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._send_after_window(), name="lease-batch")
        return await asyncio.shield(future)

    async def _send_after_window(self) -> None:
        await asyncio.sleep(self._window)
        batch, self._waiting = self._waiting, {}
        try:
            held = await self._renew_many(list(batch))
        except Exception as error:  # noqa: BLE001 - every keeper sees a failed renewal and retries
            for future in batch.values():
                if not future.done():
                    future.set_exception(error)
            return
        for key, future in batch.items():
            if not future.done():
                future.set_result(key in held)

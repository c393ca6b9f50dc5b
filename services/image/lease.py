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

"""NOTIFY just after the commit that calls for it, not inside it.

PostgreSQL serializes the commits of transactions that NOTIFY: one lock for the whole
server, held from before the commit record is written until the commit is flushed to disk.
Every NOTIFYing commit of every database thus waits for the fsync of the one before it
(on this machine: 650 inserts/s with 16 in flight when each NOTIFYs in its transaction,
2,200 when the NOTIFY follows in a statement of its own, 2,450 with none). A transaction
that only NOTIFYs writes no WAL, so it holds the lock for microseconds.

So a hot writer commits plain and hands its notifications here; a background task sends
everything handed over since its last round in one statement on a connection of its own.
A listener hears of a change after it is committed, as with a trigger. A notification is
lost only if the process dies between the commit and the send (or the database stays away
for the whole retry): the listeners' safety nets cover that (the outbox relay polls; the
next change of a watched row wakes its watchers again).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)

_SEND_TIMEOUT_SECONDS = 5.0
_RETRY_SECONDS = 0.5
_SEND_ATTEMPTS = 5
_SEND_FAILURES = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class Notices:
    """Notifications handed over by writers, sent after their commits; run() sends them."""

    def __init__(self, pool: asyncpg.Pool, *, name: str) -> None:
        self._pool = pool
        self._name = name
        # An ordered set: a row changed twice before a round is announced once.
        self._pending: dict[tuple[str, str], None] = {}
        self._wake = asyncio.Event()
        self.sent_total = 0

    def notify(self, channel: str, payload: str = "") -> None:
        """Call after the commit: the notification leaves in the next round."""
        self._pending[(channel, payload)] = None
        self._wake.set()

    async def run(self) -> None:
        """Sends until cancelled (run it under shared.background.start_supervised)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Sends what is pending now; on failure keeps it for the next round after a pause."""
        batch, self._pending = list(self._pending), {}
        for attempt in range(1, _SEND_ATTEMPTS + 1):
            try:
                await self._send(batch)
                self.sent_total += len(batch)
                return
            # InternalClientError: a connection whose server went away mid-use can answer
            # with it (not an InterfaceError) before the pool notices and reconnects.
            except _SEND_FAILURES as error:
                log.warning(
                    "notices.send_failed",
                    extra={"notices": self._name, "notifications": len(batch), "attempt": attempt, "error": repr(error)},
                )
                await asyncio.sleep(_RETRY_SECONDS)
        log.error("notices.dropped", extra={"notices": self._name, "notifications": len(batch)})

    async def _send(self, batch: list[tuple[str, str]]) -> None:
        if not batch:
            return
        channels = [channel for channel, _ in batch]
        payloads = [payload for _, payload in batch]
        async with self._pool.acquire(timeout=_SEND_TIMEOUT_SECONDS) as conn:
            await conn.execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS n(c, p)",
                channels,
                payloads,
                timeout=_SEND_TIMEOUT_SECONDS,
            )

"""Row changes pushed by PostgreSQL: one LISTEN connection per process, fanned out.

A trigger NOTIFYs a channel with a row's id on every change of it (story.stories ->
`story_changes`, image.jobs -> `image_job_changes`), whichever process made it. A feed holds
the one connection of its process that listens, and wakes every watcher of that id in this
process. Watchers of one id share each read of it, so a thousand watchers of a story cost
one query per change. WatchStory and WatchGenerationJob are built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from shared.config import Secret

log = logging.getLogger(__name__)

_RECONNECT_SECONDS = 1.0
_CONNECT_TIMEOUT_SECONDS = 10.0


class WatcherLimitReached(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} watchers already")
        self.limit = limit


class _Watched:
    """Everything the watchers of one id share."""

    def __init__(self) -> None:
        self.generation = 0
        self.changed = asyncio.Event()
        self.watchers = 0
        self.read_lock = asyncio.Lock()
        self.read_generation = -1
        self.latest: Any = None

    def bump(self) -> None:
        self.generation += 1
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class Subscription:
    """One watcher's view: wait for a change, then read the row (shared with the others)."""

    def __init__(self, watched: _Watched, feed: ChangeFeed) -> None:
        self._watched = watched
        self._feed = feed
        self._seen = watched.generation

    @property
    def closing(self) -> bool:
        return self._feed.closing

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def wait(self, timeout: float) -> bool:
        """True once the row changed since the last wait; False after `timeout` or once
        the feed is closing (the stream then ends with the current state)."""
        watched = self._watched
        if self._feed.closing:
            return False
        changed = watched.changed
        if watched.generation == self._seen:
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    await changed.wait()
            except TimeoutError:
                return False
        self._seen = watched.generation
        return True

    async def current(self, read: Callable[[], Awaitable[Any]]) -> Any:
        """The row as of the latest change: read once per change for every watcher."""
        watched = self._watched
        async with watched.read_lock:
            if watched.read_generation != watched.generation:
                generation = watched.generation
                watched.latest = await read()
                watched.read_generation = generation
            return watched.latest


class ChangeFeed:
    """The watchers of one NOTIFY channel in this process; `name` goes on its log lines."""

    def __init__(
        self, dsn: Secret[str] | str, *, channel: str, max_watchers: int, application_name: str, name: str
    ) -> None:
        self._dsn = dsn
        self.channel = channel
        self.name = name
        self._max_watchers = max_watchers
        self._application_name = application_name
        self._watched: dict[str, _Watched] = {}
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.listening = asyncio.Event()
        self.closing = False

    @property
    def watchers(self) -> int:
        return self._watchers

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name=f"{self.name}-change-feed")

    async def end_watches(self) -> None:
        """Shutting down: every stream ends now, with the current state, and no new one waits."""
        self.closing = True
        for watched in self._watched.values():
            watched.bump()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()
        for watched in self._watched.values():
            watched.bump()  # nobody waits on a feed that is gone

    @contextlib.asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[Subscription]:
        if self._watchers >= self._max_watchers:
            raise WatcherLimitReached(self._max_watchers)
        watched = self._watched.setdefault(key, _Watched())
        watched.watchers += 1
        self._watchers += 1
        try:
            yield Subscription(watched, self)
        finally:
            self._watchers -= 1
            watched.watchers -= 1
            if watched.watchers == 0:
                self._watched.pop(key, None)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, key: str) -> None:
        watched = self._watched.get(key)
        if watched is not None:
            watched.bump()

    async def _listen_forever(self) -> None:
        while True:
            try:
                conn = await self._connect()
                # Changes made while nobody listened are unknown: every watcher reads again.
                for watched in self._watched.values():
                    watched.bump()
                self.listening.set()
                while not conn.is_closed():
                    await asyncio.sleep(_RECONNECT_SECONDS)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("changes.connection_lost", extra={"feed": self.name, "error": repr(error)})
            self.listening.clear()
            await self._close()
            await asyncio.sleep(_RECONNECT_SECONDS)

    async def _connect(self) -> asyncpg.Connection:
        dsn = self._dsn.reveal() if isinstance(self._dsn, Secret) else self._dsn
        conn = await asyncpg.connect(
            dsn, timeout=_CONNECT_TIMEOUT_SECONDS, server_settings={"application_name": self._application_name}
        )
        self._conn = conn
        await conn.add_listener(self.channel, self._on_notify)
        log.info("changes.listen_started", extra={"feed": self.name, "channel": self.channel})
        return conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()

"""Story changes pushed by PostgreSQL: one LISTEN connection per process, fanned out.

A trigger on story.stories NOTIFYs `story_changes` with the story id on every change
(migration 0002), whichever story process made it. This feed holds the one connection that
listens, and wakes every watcher of that story in this process. Watchers of one story share
each read of it, so a thousand watchers of a story cost one query per change.
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

CHANNEL = "story_changes"
_RECONNECT_SECONDS = 1.0
_CONNECT_TIMEOUT_SECONDS = 10.0


class WatcherLimitReached(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} watchers already")
        self.limit = limit


class _Story:
    """Everything the watchers of one story share."""

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
    """One watcher's view: wait for a change, then read the story (shared with the others)."""

    def __init__(self, story: _Story, feed: StoryChangeFeed) -> None:
        self._story = story
        self._feed = feed
        self._seen = story.generation

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def wait(self, timeout: float) -> bool:
        """True once the story changed since the last wait; False after `timeout` or once
        the feed is closing (the stream then ends with the current state)."""
        story = self._story
        if self._feed.closing:
            return False
        changed = story.changed
        if story.generation == self._seen:
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    await changed.wait()
            except TimeoutError:
                return False
        self._seen = story.generation
        return True

    async def current(self, read: Callable[[], Awaitable[Any]]) -> Any:
        """The story as of the latest change: read once per change for every watcher."""
        story = self._story
        async with story.read_lock:
            if story.read_generation != story.generation:
                generation = story.generation
                story.latest = await read()
                story.read_generation = generation
            return story.latest


class StoryChangeFeed:
    def __init__(self, dsn: Secret[str] | str, *, max_watchers: int, application_name: str) -> None:
        self._dsn = dsn
        self._max_watchers = max_watchers
        self._application_name = application_name
        self._stories: dict[str, _Story] = {}
        self._watchers = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.listening = asyncio.Event()
        self.closing = False

    @property
    def watchers(self) -> int:
        return self._watchers

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="story-change-feed")

    async def end_watches(self) -> None:
        """Shutting down: every stream ends now, with the current state, and no new one waits."""
        self.closing = True
        for story in self._stories.values():
            story.bump()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close()
        for story in self._stories.values():
            story.bump()  # nobody waits on a feed that is gone

    @contextlib.asynccontextmanager
    async def watch(self, story_id: str) -> AsyncIterator[Subscription]:
        if self._watchers >= self._max_watchers:
            raise WatcherLimitReached(self._max_watchers)
        story = self._stories.setdefault(story_id, _Story())
        story.watchers += 1
        self._watchers += 1
        try:
            yield Subscription(story, self)
        finally:
            self._watchers -= 1
            story.watchers -= 1
            if story.watchers == 0:
                self._stories.pop(story_id, None)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, story_id: str) -> None:
        story = self._stories.get(story_id)
        if story is not None:
            story.bump()

    async def _listen_forever(self) -> None:
        while True:
            try:
                conn = await self._connect()
                # Changes made while nobody listened are unknown: every watcher reads again.
                for story in self._stories.values():
                    story.bump()
                self.listening.set()
                while not conn.is_closed():
                    await asyncio.sleep(_RECONNECT_SECONDS)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("story.change_feed_lost", extra={"error": repr(error)})
            self.listening.clear()
            await self._close()
            await asyncio.sleep(_RECONNECT_SECONDS)

    async def _connect(self) -> asyncpg.Connection:
        dsn = self._dsn.reveal() if isinstance(self._dsn, Secret) else self._dsn
        conn = await asyncpg.connect(
            dsn, timeout=_CONNECT_TIMEOUT_SECONDS, server_settings={"application_name": self._application_name}
        )
        self._conn = conn
        await conn.add_listener(CHANNEL, self._on_notify)
        log.info("story.change_feed_started", extra={"channel": CHANNEL})
        return conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await conn.close()

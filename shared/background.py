"""Long-running work of a service (an outbox relay), restarted after a crash, stopped at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

STOP_SECONDS = 5.0
RESTART_DELAY_SECONDS = 1.0


async def start_supervised(
    stack: contextlib.AsyncExitStack, work: Callable[[], Awaitable[None]], name: str, *, stop_seconds: float = STOP_SECONDS
) -> None:
    """Runs `work` until the stack closes, restarting it after a crash: a relay that died
    quietly would leave every later event waiting."""

    async def supervise() -> None:
        while True:
            try:
                await work()
            except Exception as error:  # noqa: BLE001 - logged, then restarted
                log.error("background.crashed", extra={"task": name, "error": repr(error)})
            await asyncio.sleep(RESTART_DELAY_SECONDS)

    task = asyncio.create_task(supervise(), name=name)

    async def cancel() -> None:
        task.cancel()
        # Bounded: a library that swallows the cancellation must not hang shutdown.
        done, _ = await asyncio.wait({task}, timeout=stop_seconds)
        if not done:
            log.error("background.stop_timed_out", extra={"task": name})

    stack.push_async_callback(cancel)

"""Live previews over core NATS: the worker that paints a job publishes each preview on
`image.job.preview.<job_id>`, and every process with a watcher of that job subscribes to it.

Core NATS, not JetStream: a preview is worth something only while someone is watching, so
nothing is stored (no stream, no S3 object, no storage counted) and a preview that finds no
subscriber is simply gone. A watcher that falls behind loses previews, never job changes
(those come from the change feed and the job row). NATS away costs previews only: the
connection is made in the background and publishes without one are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from nats.aio.client import Client

from shared.config import NatsSettings
from shared.nats import connect_nats_until_ready

log = logging.getLogger(__name__)

PREVIEW_SUBJECT_PREFIX = "image.job.preview"
# Previews one watcher may have waiting; past that the oldest waiting one is dropped.
WATCHER_BACKLOG = 8


def preview_subject(job_id: uuid.UUID) -> str:
    return f"{PREVIEW_SUBJECT_PREFIX}.{job_id}"


class PreviewBus:
    """One core NATS connection per process for publishing and following previews."""

    def __init__(self, nats: NatsSettings) -> None:
        self._nats = nats
        self._client: Client | None = None

    async def run(self) -> None:
        """Connects (retrying until NATS answers) and keeps the connection until cancelled."""
        client = await connect_nats_until_ready(self._nats, name="image-previews")
        assert client is not None
        self._client = client
        try:
            await asyncio.Event().wait()
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                await client.close()

    async def publish(self, job_id: uuid.UUID, payload: bytes) -> None:
        client = self._client
        if client is None or not client.is_connected:
            log.info("preview.dropped", extra={"job_id": str(job_id), "reason": "nats not connected"})
            return
        # nats-py hands the bytes to its writer at once; no flush round trip per preview.
        await client.publish(preview_subject(job_id), payload)

    @contextlib.asynccontextmanager
    async def watch(self, job_id: uuid.UUID) -> AsyncIterator[asyncio.Queue[bytes]]:
        """A queue of the job's previews from now on (empty for good if NATS is away)."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=WATCHER_BACKLOG)

        async def received(message) -> None:
            if queue.full():
                queue.get_nowait()  # a slow watcher sees the newest previews
            queue.put_nowait(message.data)

        client = self._client
        subscription = None
        if client is not None and client.is_connected:
            try:
                subscription = await client.subscribe(preview_subject(job_id), cb=received)
                # The server has the interest before the caller reads the job, so no preview
                # published after that read is missed.
                await client.flush(timeout=2)
            except Exception as error:  # noqa: BLE001 - previews are best effort
                log.warning("preview.subscribe_failed", extra={"job_id": str(job_id), "error": repr(error)})
        try:
            yield queue
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

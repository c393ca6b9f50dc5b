"""shared/notices.py: NOTIFYs sent after the commit, batched, on a real PostgreSQL; and
shared/http_transport.py: many requests in flight over small keep-alive pools."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
from aiohttp import web

from shared.db import close_pool, create_pool
from shared.http_transport import ShardedTransport
from shared.notices import Notices


async def _listening(database_url: str, channel: str) -> tuple[asyncpg.Connection, asyncio.Queue[str]]:
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    await conn.add_listener(channel, lambda _conn, _pid, _channel, payload: heard.put_nowait(payload))
    return conn, heard


async def test_every_notice_handed_over_reaches_a_listener_once_per_round(database_url: str):
    listener, heard = await _listening(database_url, "test_notices")
    pool = await create_pool(database_url, min_size=1, max_size=1, application_name="test-notices")
    notices = Notices(pool, name="test")
    sender = asyncio.create_task(notices.run())
    try:
        for key in ("a", "b", "a", "c"):  # handed over before the sender runs: one round
            notices.notify("test_notices", key)
        received = [await asyncio.wait_for(heard.get(), 5) for _ in range(3)]
        assert sorted(received) == ["a", "b", "c"]
        notices.notify("test_notices", "d")
        assert await asyncio.wait_for(heard.get(), 5) == "d"
        await asyncio.sleep(0.2)
        assert heard.empty()  # "a" twice in one round was announced once
        assert notices.sent_total == 4
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await close_pool(pool)
        await listener.close()


async def test_a_notice_still_leaves_after_its_connection_was_killed(database_url: str):
    listener, heard = await _listening(database_url, "test_notices_retry")
    pool = await create_pool(database_url, min_size=1, max_size=1, application_name="test-notices")
    notices = Notices(pool, name="test")
    try:
        # The pooled connection dies under the sender: a send on it fails, and the retry
        # (or the pool's own reconnect) delivers on a fresh one.
        async with pool.acquire() as conn:
            await conn.execute("SELECT 1")
        killer = await asyncpg.connect(database_url)
        await killer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'test-notices'"
        )
        await killer.close()
        notices.notify("test_notices_retry", "x")
        await notices.flush()
        assert await asyncio.wait_for(heard.get(), 5) == "x"
    finally:
        await close_pool(pool)
        await listener.close()


async def test_sharded_transport_keeps_connections_alive_and_balances_the_shards():
    peers: set[tuple] = set()
    in_flight = 0
    most = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        peers.add(request.transport.get_extra_info("peername"))
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return web.Response(body=b"x" * 1000)

    app = web.Application()
    app.router.add_get("/", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    transport = ShardedTransport(max_connections=100, shard_connections=32)
    try:
        assert transport.shards == 4
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):  # the second round reuses the first round's connections
                answers = await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/") for _ in range(100)))
                assert all(answer.status_code == 200 and len(answer.content) == 1000 for answer in answers)
        assert most == 100  # none waited for another: the shards hold all hundred at once
        assert len(peers) == 100  # one connection each, kept alive for the second round
        assert transport._in_flight == [0, 0, 0, 0]
    finally:
        await runner.cleanup()

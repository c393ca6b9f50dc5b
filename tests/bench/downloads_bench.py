"""The provider-image download's client CPU per MiB against aiohttp's, side by side.

A child process serves one 1 MiB object over HTTP/1.1 on loopback (aiohttp.web, so the
server is the same for both clients). A second child, set up as the image service's process
is (uvloop, shared.allocator's malloc settings), downloads it again and again with
services.image.providers.download.ImageDownloader (httpx: bounded decoded size, redirects
checked, connections kept alive per host name as the service does) and with a plain aiohttp
ClientSession reading the whole body, and measures its own CPU time per MiB. Rounds
alternate so that machine noise hits both. The image check after the download (Pillow) is the same for any HTTP client and
is left out of both sides.

ALLOW_PRIVATE_DOWNLOADS is on for the downloader, as it must be for any server on loopback:
the address check of a public host (one getaddrinfo per download) is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from aiohttp import web

from services.image.providers.download import HostConnections, ImageDownloader
from shared.allocator import keep_large_buffers
from tests.bench.report import Figure, ratio_figure

CPU_AIM = "ratio <= 2"
MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("downloads")
    group.add_argument("--downloads", type=int, default=100, help="downloads of the 1 MiB object per client per round")


def _serve(connection, size: int) -> None:
    body = bytes(range(256)) * (size // 256)

    async def image(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/png")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/image.png", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        connection.send(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _measure_in_service_process(sender, port: int, rounds: int, downloads: int) -> None:
    """Both clients, measured in a process set up as the image service's is (uvloop, glibc
    malloc keeping large buffers: shared.grpc_server.serve_main), not as the bench's own."""
    keep_large_buffers()
    sender.send(uvloop.run(_measure(port, rounds, downloads)))


async def _measure(port: int, rounds: int, downloads: int) -> tuple[list[float], list[float]]:
    url = f"http://127.0.0.1:{port}/image.png"
    connections = HostConnections()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(connections.aclose)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        # What the image service downloads with: connections kept alive per host name.
        downloader = ImageDownloader(allow_private=True, connections=connections)

        async def with_downloader() -> int:
            return len(await downloader.download(url))

        async def with_aiohttp() -> int:
            async with session.get(url) as response:
                return len(await response.read())

        for download in (with_downloader, with_aiohttp):  # warm-up: connections, code paths
            await _cpu_ms_per_mib(download, 5)
        httpx_ms, aiohttp_ms = [], []
        for _ in range(rounds):
            httpx_ms.append(await _cpu_ms_per_mib(with_downloader, downloads))
            aiohttp_ms.append(await _cpu_ms_per_mib(with_aiohttp, downloads))
    return httpx_ms, aiohttp_ms


async def _cpu_ms_per_mib(download: Callable[[], Awaitable[int]], count: int) -> float:
    received = 0
    started = time.process_time()
    for _ in range(count):
        received += await download()
    return (time.process_time() - started) * 1000 / (received / MIB)


async def run(args: argparse.Namespace) -> list[Figure]:
    spawn = multiprocessing.get_context("spawn")
    parent, child = multiprocessing.Pipe()
    server = spawn.Process(target=_serve, args=(child, MIB), daemon=True)
    server.start()
    try:
        port = parent.recv()
        results, sender = multiprocessing.Pipe(duplex=False)
        client = spawn.Process(target=_measure_in_service_process, args=(sender, port, args.rounds, args.downloads))
        client.start()
        httpx_ms, aiohttp_ms = await asyncio.to_thread(results.recv)
        await asyncio.to_thread(client.join, 10)
    finally:
        server.terminate()
        server.join(5)
    ratios = [round(h / a, 3) for h, a in zip(httpx_ms, aiohttp_ms, strict=True)]
    return [
        ratio_figure(
            "downloads.client_cpu_per_mib", statistics.median(httpx_ms), statistics.median(aiohttp_ms), "ms CPU/MiB",
            aim=CPU_AIM, baseline_is="aiohttp ClientSession reading the same 1 MiB object from the same server",
            downloads_per_round=args.downloads, ratio_per_round=ratios,
        )
    ]

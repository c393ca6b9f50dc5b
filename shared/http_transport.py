"""An httpx transport made of several small connection pools, for a process that keeps
hundreds of requests in flight at once (a thousand generation jobs waiting on a provider).

httpcore's pool (1.0.9, the latest) walks every connection it holds each time a request
starts or ends, and for every idle one counts all of them again: with a thousand
connections that is about a million steps per request, and in the jobs bench it was half
of the image process's CPU. The same count closes every connection that goes idle while
the pool holds more than max_keepalive_connections in all, so past that number nothing is
reused and every request pays a new connection. Shards of a few dozen connections keep
both small; each request goes to the shard with the fewest requests in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from shared.asyncio_network import asyncio_http_transport

SHARD_CONNECTIONS = 32


class ShardedTransport(httpx.AsyncBaseTransport):
    """At most `max_connections` in all, kept alive in shards of about `shard_connections`."""

    def __init__(self, *, max_connections: int, shard_connections: int = SHARD_CONNECTIONS, **options: Any) -> None:
        count = max(1, -(-max_connections // shard_connections))
        per_shard = -(-max_connections // count)
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._shards = [asyncio_http_transport(limits=limits, **options) for _ in range(count)]
        self._in_flight = [0] * count

    @property
    def shards(self) -> int:
        return len(self._shards)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self._shards)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            self._in_flight[index] -= 1
            raise
        # The connection stays taken until the body is read or the response closed.
        response.stream = _ReleasedOnClose(response.stream, lambda: self._release(index))
        return response

    def _release(self, index: int) -> None:
        self._in_flight[index] -= 1

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _ReleasedOnClose(httpx.AsyncByteStream):
    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()

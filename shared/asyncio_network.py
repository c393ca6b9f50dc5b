"""httpcore's network layer on asyncio's own transports, for every httpx client of a service.

httpcore (1.0.9) reaches the network through anyio, and anyio pays on every socket read:
sniffio asks which async library runs, a cancel scope is opened and closed for the read's
timeout, and the bytes pass through anyio's stream object. For a 1 MiB image that was a
quarter of the download's CPU (tests/bench, downloads part), and each idle connection
reused was first polled with a select() syscall to see whether the server had closed it.
Here a protocol collects what asyncio delivers and a read hands over the next chunk as it
came; a timeout is one timer handle, armed only when the read has to wait; and whether an
idle connection is readable is a look at what the protocol already received.

`asyncio_http_transport()` is httpx.AsyncHTTPTransport with this backend underneath:
same options, same pool, same TLS settings; only the network calls differ.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

# Bytes received and not yet read past which the socket stops being read (flow control):
# a slow consumer must not let a fast server fill the process's memory.
PAUSE_READING_BYTES = 4 * 1024 * 1024
RESUME_READING_BYTES = 1024 * 1024


def asyncio_http_transport(**options: Any) -> httpx.AsyncHTTPTransport:
    """httpx.AsyncHTTPTransport(**options) whose connections run on AsyncioBackend."""
    transport = httpx.AsyncHTTPTransport(**options)
    pool = getattr(transport, "_pool", None)
    # httpx takes no network backend of its own; its pool (httpcore's) does, in the
    # attribute every connection it opens reads. Checked, so an httpx or httpcore that
    # moved it fails at start-up rather than silently running on anyio.
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("httpx.AsyncHTTPTransport no longer keeps an httpcore pool with a network backend")
    pool._network_backend = AsyncioBackend()
    return transport


def asyncio_connection_pool(
    *, max_connections: int, max_keepalive_connections: int, keepalive_expiry: float
) -> httpcore.AsyncConnectionPool:
    """httpcore's HTTP/1.1 pool, as httpx.AsyncHTTPTransport builds it (httpx's TLS context,
    no retries), on AsyncioBackend, for a caller that sends httpcore requests itself."""
    return httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=AsyncioBackend(),
    )


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[tuple] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        loop = asyncio.get_running_loop()
        # asyncio (and uvloop) set TCP_NODELAY on TCP connections themselves.
        return await _connected(loop.create_connection(_Receiver, host, port, local_addr=local), timeout, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[tuple] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        return await _connected(loop.create_unix_connection(_Receiver, path), timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connected(connecting, timeout: float | None, socket_options: Iterable[tuple] | None) -> AsyncioStream:
    try:
        async with asyncio.timeout(timeout):
            transport, receiver = await connecting
    except TimeoutError as error:
        raise httpcore.ConnectTimeout(str(error) or "connect timed out") from error
    except OSError as error:
        raise httpcore.ConnectError(str(error)) from error
    raw = transport.get_extra_info("socket")
    for option in socket_options or ():
        raw.setsockopt(*option)
    return AsyncioStream(transport, receiver)


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, receiver: _Receiver) -> None:
        self._transport = transport
        self._receiver = receiver

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._receiver.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._receiver.lost or self._transport.is_closing():
            raise httpcore.WriteError(str(self._receiver.error or "connection closed"))
        self._transport.write(buffer)
        await self._receiver.drained(timeout)

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        if self._receiver.has_unread():
            # Bytes the server sent in the clear before the handshake: nothing honest does that.
            self._transport.close()
            raise httpcore.ConnectError("the server sent data before the TLS handshake")
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(self._transport, self._receiver, ssl_context, server_hostname=server_hostname,
                                       ssl_handshake_timeout=timeout)  # fmt: skip
        except TimeoutError as error:
            self._transport.close()
            raise httpcore.ConnectTimeout(str(error) or "TLS handshake timed out") from error
        except (OSError, ssl.SSLError, ConnectionError) as error:
            self._transport.close()
            raise httpcore.ConnectError(str(error)) from error
        self._receiver.transport = tls
        return AsyncioStream(tls, self._receiver)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks before reusing an idle connection: anything received (or the
            # server's close) while idle means the connection cannot take a new request.
            return self._receiver.has_unread() or self._receiver.lost
        name = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername",
                "socket": "socket"}.get(info)  # fmt: skip
        return None if name is None else self._transport.get_extra_info(name)


class _Receiver(asyncio.Protocol):
    """What the connection received, kept as the chunks asyncio delivered."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False  # the server closed its side, or the connection broke
        self.error: BaseException | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > PAUSE_READING_BYTES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False  # close the transport: HTTP/1.1 never half-closes a client connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def has_unread(self) -> bool:
        return bool(self._chunks)

    async def read(self, max_bytes: int, timeout: float | None) -> bytes:
        if not self._chunks and not self.lost:
            await self._wait(timeout, httpcore.ReadTimeout)
        if not self._chunks:
            if self.error is not None:
                raise httpcore.ReadError(str(self.error) or type(self.error).__name__)
            return b""  # the server closed the connection
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= RESUME_READING_BYTES:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    async def drained(self, timeout: float | None) -> None:
        while self._writing_paused and not self.lost:
            await self._wait(timeout, httpcore.WriteTimeout)
        if self.lost and self.error is not None:
            raise httpcore.WriteError(str(self.error) or type(self.error).__name__)

    async def _wait(self, timeout: float | None, timeout_error: type[Exception]) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise timeout_error(f"no progress for {timeout} s") from None
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


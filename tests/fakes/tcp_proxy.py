"""A TCP forwarder that tests can cut and restore, to fake a network fault in front of a server.

Stopping moto would lose its in-memory objects; cutting a proxy in front of it takes S3
"down" for the code under test while the data stays put.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct

from tools.infra import free_port

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024


class TcpProxy:
    """127.0.0.1:<port> -> target_host:target_port, one upstream connection per client."""

    def __init__(self, target_host: str, target_port: int, *, port: int | None = None):
        # Seconds each chunk waits before it is forwarded, either way: a slow link.
        self.delay_seconds = 0.0
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """http://host:port, for clients that take an endpoint URL (S3, HTTP fakes)."""
        return f"http://{self.address}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        log.info("tcp_proxy.listening", extra={"proxy": self.address, "target": f"{self.target_host}:{self.target_port}"})
        return self

    async def cut(self) -> None:
        """Stop listening and reset every open connection: new connects are refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        log.info("tcp_proxy.cut", extra={"proxy": self.address})

    async def restore(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self.cut()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Every way out closes both sockets, a cancellation too (a test's loop cancels this
        # task when it ends while the upstream connect is still on its way): a socket left
        # to the garbage collector is reported in whatever test runs next.
        self._writers.add(client_writer)  # cut() resets it even while we connect upstream
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                _reset(client_writer)  # the target is down: the client sees it as we do
                return
            if self._server is None:  # cut while we were connecting upstream
                _reset(client_writer)
                _reset(upstream_writer)
                return
            self._writers.add(upstream_writer)
            pumps = [
                asyncio.ensure_future(_pump(client_reader, upstream_writer, self)),
                asyncio.ensure_future(_pump(upstream_reader, client_writer, self)),
            ]
            self._pumps.update(pumps)
            try:
                await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                self._pumps.difference_update(pumps)
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: TcpProxy) -> None:
    """Copy one direction until EOF, then half-close, as the two ends would see it directly."""
    try:
        while data := await reader.read(CHUNK_BYTES):
            if proxy.delay_seconds:
                await asyncio.sleep(proxy.delay_seconds)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError):
        _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: a peer mid-request sees a reset, like a dropped link."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

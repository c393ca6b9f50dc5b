"""shared/asyncio_network.py: httpx on asyncio's own transports, against real servers on
loopback (plain and TLS), with the faults a provider's server commits."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.asyncio_network import AsyncioStream, asyncio_http_transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def on_both_loops(case: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """The test `case` run once on uvloop (what the services run) and once on plain asyncio
    (what a tool or a test might run)."""

    @pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
    def test(loop: str, **fixtures) -> None:
        (uvloop.run if loop == "uvloop" else asyncio.run)(case(**fixtures))

    parameters = inspect.signature(case).parameters.values()
    test.__signature__ = inspect.Signature([inspect.Parameter("loop", inspect.Parameter.KEYWORD_ONLY), *(
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters)])  # fmt: skip
    test.__name__ = case.__name__
    return test


class Server:
    """An HTTP/1.1 server on 127.0.0.1 that counts the connections it accepted."""

    def __init__(self, respond: Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]):
        self._respond = respond
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not await self._respond(head, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(respond, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(respond)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def ok(body: bytes, *, close: bool = False):
    async def respond(_head: bytes, _reader, writer: asyncio.StreamWriter) -> bool:
        headers = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "")
        writer.write(headers.encode() + b"\r\n" + body)
        await writer.drain()
        return not close

    return respond


@on_both_loops
async def test_requests_reuse_one_kept_alive_connection():
    async with serving(ok(b"portrait")) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport()) as client:
            bodies = [(await client.get(f"http://127.0.0.1:{server.port}/{n}")).content for n in range(5)]
    assert bodies == [b"portrait"] * 5
    assert server.connections == 1


@on_both_loops
async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async def respond_then_hang_up(head, reader, writer) -> bool:
        await ok(b"once")(head, reader, writer)
        return False  # closes the connection after answering, without saying so

    async with serving(respond_then_hang_up) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport()) as client:
            first = await client.get(f"http://127.0.0.1:{server.port}/")
            await asyncio.sleep(0.05)  # the close reaches the idle connection
            second = await client.get(f"http://127.0.0.1:{server.port}/")
    assert (first.content, second.content) == (b"once", b"once")
    assert server.connections == 2


@on_both_loops
async def test_a_large_body_read_slowly_arrives_whole():
    body = bytes(range(256)) * (40 * 1024)  # 10 MiB: past the point where reading pauses
    async with serving(ok(body)) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport()) as client:
            async with client.stream("GET", f"http://127.0.0.1:{server.port}/") as response:
                received = bytearray()
                async for chunk in response.aiter_raw():
                    received += chunk
                    await asyncio.sleep(0.001)
    assert bytes(received) == body


@on_both_loops
async def test_a_large_request_body_is_written_whole():
    async def echo_length(head: bytes, reader: asyncio.StreamReader, writer) -> bool:
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        return await ok(str(length).encode())(head, reader, writer)

    payload = b"x" * (6 * 1024 * 1024)
    async with serving(echo_length) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport()) as client:
            response = await client.post(f"http://127.0.0.1:{server.port}/", content=payload)
    assert response.content == str(len(payload)).encode()


@on_both_loops
async def test_a_server_that_stalls_mid_body_times_out_as_a_read_timeout():
    async def stall(_head, _reader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(30)
        return False

    async with serving(stall) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport(), timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"http://127.0.0.1:{server.port}/")
    assert 0.25 <= time.monotonic() - started < 5


@on_both_loops
async def test_a_server_that_hangs_up_mid_body_is_a_protocol_or_read_error():
    async def hang_up(_head, _reader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        return False

    async with serving(hang_up) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport()) as client:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await client.get(f"http://127.0.0.1:{server.port}/")


@on_both_loops
async def test_nothing_listening_is_a_connect_error():
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    async with httpx.AsyncClient(transport=asyncio_http_transport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


def _self_signed(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only that certificate) for `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


@on_both_loops
async def test_https_verifies_the_server_and_keeps_the_connection(tmp_path):
    server_tls, client_tls = _self_signed(tmp_path, "images.example")
    async with serving(ok(b"over tls"), server_tls) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport(verify=client_tls)) as client:
            url = f"https://127.0.0.1:{server.port}/"
            responses = [await client.get(url) for _ in range(3)]
    assert [response.content for response in responses] == [b"over tls"] * 3
    assert server.connections == 1


@on_both_loops
async def test_https_refuses_a_certificate_it_does_not_trust(tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "other").mkdir()
    server_tls, _ = _self_signed(tmp_path / "server", "images.example")
    _, other_client_tls = _self_signed(tmp_path / "other", "other.example")
    async with serving(ok(b"never"), server_tls) as server:
        async with httpx.AsyncClient(transport=asyncio_http_transport(verify=other_client_tls)) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"https://127.0.0.1:{server.port}/")


@on_both_loops
async def test_the_connections_are_asyncio_streams():
    async with serving(ok(b"portrait")) as server:
        transport = asyncio_http_transport()
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"http://127.0.0.1:{server.port}/")
            streams = [connection._connection._network_stream for connection in transport._pool.connections]
    assert streams and all(isinstance(stream, AsyncioStream) for stream in streams)

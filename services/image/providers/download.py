"""Fetch a provider's image URL without letting that URL reach our own network (no SSRF)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import httpcore
import httpx
from h11._receivebuffer import ReceiveBuffer

from services.image.providers.base import GeneratedImage, ProviderError
# Re-exported: the downloader's check is the one every image passes.
from services.image.providers.pictures import MAX_PIXELS, image_from_bytes  # noqa: F401
from shared.asyncio_network import asyncio_connection_pool

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# We decode bodies ourselves to count decoded bytes.
_DOWNLOAD_HEADERS = {"Accept-Encoding": "gzip, deflate"}
# A client shared by every host name (one a caller passes in) closes each connection after
# its one response: a pooled connection pinned to an address could otherwise serve a later
# request for another host name at that address, under the first name's TLS session.
_ONE_SHOT_HEADERS = {**_DOWNLOAD_HEADERS, "Connection": "close"}
# httpcore reads at most 64 KiB per receive; asyncio hands it up to 256 KiB at a time, and
# anyio slices the rest off into a new bytes object on every read, so a 1 MiB body cost
# about a dozen copies of its tail. One read takes whatever arrived. The attribute is
# httpcore's per-connection read cap for every client of the process; nothing is allocated
# up front by it, so the provider calls' clients lose nothing.
_READ_BYTES = 1024 * 1024
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = max(httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, _READ_BYTES)


def _extract_at_most_without_copies(self: ReceiveBuffer, count: int) -> bytearray | None:
    """h11's ReceiveBuffer.maybe_extract_at_most, minus two copies of every body chunk.

    h11 (0.14-0.16) slices the first `count` bytes off its buffer twice, once only to see
    whether any are there; a body read of a whole buffer then copies it twice more than
    it needs to (a third of a 1 MiB download's CPU, with the copy into the buffer and
    httpcore's bytes()). When the body takes the whole buffer, the buffer itself is handed
    out and a new one started: the same bytes, the same state left behind.
    """
    data = self._data
    if not data:
        return None
    if count < len(data):
        return self._extract(count)
    self._data = bytearray()
    self._next_line_search = 0
    self._multiple_lines_search = 0
    return data


# Every h11 connection of the process reads bodies through this; the test of the download
# path (and of each provider) covers it, and the check below keeps it to the h11 it was
# written against.
if h11.__version__.startswith(("0.14.", "0.15.", "0.16.")):
    ReceiveBuffer.maybe_extract_at_most = _extract_at_most_without_copies
# Host names whose connections are kept; providers serve images from a handful of hosts.
MAX_KEPT_HOSTS = 32
CONNECTIONS_PER_HOST = 32
KEEPALIVE_SECONDS = 30.0


class HostConnections:
    """Kept-alive download connections, one small pool per (scheme, host name, port, address).

    A connection is only ever reused for the host name it was opened for, at the address
    that name was checked to have, so keeping it alive cannot carry one name's request over
    another name's connection (or TLS session). Saving the TCP (and TLS) set-up of every
    image is most of the download's CPU on a fast network.

    The pools are httpcore's, the engine under httpx, spoken to directly: httpx's client
    and response layers (cookies, auth and redirect hooks, URL and header models, stream
    wrappers) were about a third of a 1 MiB download's CPU, and a download needs none of
    them: redirects and their checks are the downloader's own.
    """

    def __init__(
        self, *, max_hosts: int = MAX_KEPT_HOSTS, connections_per_host: int = CONNECTIONS_PER_HOST
    ) -> None:
        self._max_hosts = max_hosts
        self._connections_per_host = connections_per_host
        self._pools: OrderedDict[tuple, httpcore.AsyncConnectionPool] = OrderedDict()
        self._retiring: set[asyncio.Task] = set()

    def pool_for(self, target: httpx.URL, address: IpAddress | None) -> httpcore.AsyncConnectionPool:
        key = (target.scheme, target.host, target.port, str(address) if address else None)
        pool = self._pools.get(key)
        if pool is None:
            pool = asyncio_connection_pool(
                max_connections=self._connections_per_host,
                max_keepalive_connections=self._connections_per_host,
                keepalive_expiry=KEEPALIVE_SECONDS,
            )
            self._pools[key] = pool
            if len(self._pools) > self._max_hosts:
                self._retire(self._pools.popitem(last=False)[1])
        else:
            self._pools.move_to_end(key)
        return pool

    def _retire(self, pool: httpcore.AsyncConnectionPool) -> None:
        # A download may still be reading from it: close it once any download would be over.
        async def close_later() -> None:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            await pool.aclose()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.aclose()


@dataclass(frozen=True)
class _Answer:
    """One response, whichever client fetched it: its status, headers and raw body."""

    status: int
    headers: httpx.Headers
    chunks: AsyncIterator[bytes]
    aclose: Callable[[], Awaitable[None]]


class ImageDownloader:
    """Downloads one image over http(s), refusing private targets, oversize and non-images."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        max_bytes: int = 20 * 1024 * 1024,
        allow_private: bool = False,
        timeout: float = 30,
        *,
        connections: HostConnections | None = None,
    ) -> None:
        """`connections` keeps connections alive per host name (the service's way);
        otherwise `client` (or a new one per download) closes each after its response."""
        self._client = client
        self._connections = connections
        self.max_bytes = max_bytes
        self.allow_private = allow_private
        self.timeout = timeout

    async def fetch(self, url: str) -> GeneratedImage:
        return await asyncio.to_thread(image_from_bytes, await self.download(url))

    async def download(self, url: str) -> bytes:
        """The body at `url` (redirects followed and checked), not yet checked to be an image."""
        # httpx timeouts are per read; a server dripping one byte a second would never trip
        # them, so the whole download gets one deadline.
        try:
            async with asyncio.timeout(self.timeout):
                return await self._download(url)
        except TimeoutError:
            raise ProviderError("image download timed out", transient=True) from None

    async def _download(self, url: str) -> bytes:
        async with self._one_shot_client() as one_shot:
            for _ in range(MAX_REDIRECTS + 1):
                target = _parse_http_url(url)
                address = None if self.allow_private else await _resolve_public_address(target)
                if one_shot is None:
                    answer = await _send_kept(self._connections.pool_for(target, address), target, address)
                else:
                    answer = await _send(one_shot, _build_request(one_shot, target, address, _ONE_SHOT_HEADERS))
                try:
                    if answer.status not in REDIRECT_STATUSES:
                        return await self._read_body(answer)
                    url = _redirect_target(answer.headers, url)
                finally:
                    await answer.aclose()
        raise ProviderError(f"image download: more than {MAX_REDIRECTS} redirects", transient=False)

    @contextlib.asynccontextmanager
    async def _one_shot_client(self) -> AsyncIterator[httpx.AsyncClient | None]:
        """The client whose connections serve one response each; None with HostConnections."""
        if self._connections is not None:
            yield None
        elif self._client is not None:
            yield self._client
        else:
            async with httpx.AsyncClient(follow_redirects=False) as client:
                yield client

    async def _read_body(self, answer: _Answer) -> bytes:
        _raise_for_status(answer.status)
        declared = answer.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise _too_large(self.max_bytes)
        decoder = _decoder_for(answer.headers.get("content-encoding", ""))
        # The decoded pieces are kept as they come and joined once: one copy of the image in
        # all, where growing a bytearray and then turning it into bytes made three.
        pieces: list[bytes] = []
        size = 0
        try:
            # Raw bytes, decoded here with a bound: a few KB of gzip can inflate to GBs.
            async for chunk in answer.chunks:
                piece = decoder.decode(chunk, self.max_bytes - size + 1)
                pieces.append(piece)
                size += len(piece)
                if size > self.max_bytes:
                    raise _too_large(self.max_bytes)
            piece = decoder.finish(self.max_bytes - size + 1)
        except _TRANSPORT_ERRORS as error:
            raise _network_error(error) from error
        pieces.append(piece)
        size += len(piece)
        if size > self.max_bytes:
            raise _too_large(self.max_bytes)
        return b"".join(pieces)


class _Identity:
    def decode(self, chunk: bytes, _room: int) -> bytes:
        return chunk

    def finish(self, _room: int) -> bytes:
        return b""


class _Inflate:
    """gzip or deflate, never producing more than `room` bytes per call."""

    def __init__(self, wbits: int) -> None:
        self._inflater = zlib.decompressobj(wbits)
        self._first = True
        self._wbits = wbits

    def decode(self, chunk: bytes, room: int) -> bytes:
        try:
            out = self._inflater.decompress(chunk, max(room, 1))
        except zlib.error:
            if not (self._first and self._wbits == zlib.MAX_WBITS):
                raise ProviderError("image download: corrupt content-encoding", transient=False) from None
            # Some servers send "deflate" without the zlib header.
            self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            self._first = False
            return self.decode(chunk, room)
        self._first = False
        # Output at the limit with input left over: the body inflates past the cap.
        return out + (b"\0" if self._inflater.unconsumed_tail else b"")

    def finish(self, room: int) -> bytes:
        try:
            return self._inflater.flush(max(room, 1))
        except zlib.error:
            raise ProviderError("image download: corrupt content-encoding", transient=False) from None


def _build_request(
    client: httpx.AsyncClient, target: httpx.URL, address: IpAddress | None, headers: dict[str, str]
) -> httpx.Request:
    if address is None:
        return client.build_request("GET", target, headers=headers)
    # Connect to the address we checked, not to whatever a second DNS lookup returns
    # (DNS rebinding); Host and SNI keep the original name so TLS still verifies it.
    pinned = target.copy_with(host=str(address))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return client.build_request("GET", pinned, headers={**headers, "Host": _host_header(target)}, extensions=extensions)


def _decoder_for(content_encoding: str) -> _Identity | _Inflate:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Inflate(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _Inflate(zlib.MAX_WBITS)
    raise ProviderError(f"image download: unsupported content-encoding {encoding[:40]!r}", transient=False)


def is_public_address(address: IpAddress) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # ::ffff:127.0.0.1 reaches 127.0.0.1; Python 3.11 does not classify it as loopback.
            address = address.ipv4_mapped
        elif address.sixtofour is not None or address.teredo is not None or address.is_site_local:
            # 6to4 (2002::/16) and Teredo (2001::/32) tunnel to an IPv4 address of the
            # sender's choosing; site-local (fec0::/10) is a private range.
            return False
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
    )


def _parse_http_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise ProviderError("image URL is not valid", transient=False) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ProviderError("image URL must be http or https", transient=False)
    return parsed


async def _resolve_public_address(url: httpx.URL) -> IpAddress:
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            url.host, port, type=socket.SOCK_STREAM
        )
    except socket.gaierror:
        raise ProviderError("image host could not be resolved", transient=True) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    # Every address must be public: an attacker controlling DNS could otherwise return
    # one public and one internal address and hope the client picks the second.
    refused = [address for address in addresses if not is_public_address(address)]
    if refused or not addresses:
        log.warning(
            "download.address_refused",
            extra={"host": url.host, "address": str(refused[0]) if refused else ""},
        )
        raise ProviderError("image URL points to a private or reserved address", transient=False)
    return addresses[0]


def _host_header(url: httpx.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port is None else f"{host}:{url.port}"


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> _Answer:
    try:
        response = await client.send(request, stream=True, follow_redirects=False)
    except httpx.TimeoutException:
        raise ProviderError("image download timed out", transient=True) from None
    except httpx.TransportError as error:
        raise _network_error(error) from error
    return _Answer(response.status_code, response.headers, response.aiter_raw(), response.aclose)


# What a kept connection's exchange raises (httpcore's own), and a one-shot client's (httpx's).
_TIMEOUTS = (httpx.TimeoutException, httpcore.TimeoutException)
_TRANSPORT_ERRORS = (httpx.TransportError, httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError)
# What httpx's client sends by default, less the encodings we do not decode ourselves.
_KEPT_HEADERS = [
    (b"Accept", b"*/*"),
    (b"Accept-Encoding", _DOWNLOAD_HEADERS["Accept-Encoding"].encode()),
    (b"User-Agent", f"python-httpx/{httpx.__version__}".encode()),
]
# httpx's default: 5 s for each of connect, read, write and a free pooled connection.
_KEPT_TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


async def _send_kept(pool: httpcore.AsyncConnectionPool, target: httpx.URL, address: IpAddress | None) -> _Answer:
    """GET `target` over the pool's kept connections; with `address`, connected to that
    address (the one checked) under the original Host and TLS name, as _build_request does."""
    extensions: dict[str, Any] = {"timeout": _KEPT_TIMEOUTS}
    if address is not None and target.scheme == "https":
        extensions["sni_hostname"] = target.host
    url = httpcore.URL(
        scheme=target.raw_scheme,
        host=str(address).encode("ascii") if address is not None else target.raw_host,
        port=target.port,
        target=target.raw_path,
    )
    headers = [(b"Host", _host_header(target).encode("ascii")), *_KEPT_HEADERS]
    try:
        response = await pool.handle_async_request(httpcore.Request(b"GET", url, headers=headers, extensions=extensions))
    except _TIMEOUTS:
        raise ProviderError("image download timed out", transient=True) from None
    except _TRANSPORT_ERRORS as error:
        raise _network_error(error) from error
    return _Answer(response.status, httpx.Headers(response.headers), response.aiter_stream(), response.aclose)


def _redirect_target(headers: httpx.Headers, current_url: str) -> str:
    location = headers.get("location")
    if not location:
        raise ProviderError("image download: redirect without a Location", transient=False)
    return str(httpx.URL(current_url).join(location))


def _raise_for_status(status: int) -> None:
    if status < 400:
        return
    transient = status in (408, 429) or status >= 500
    raise ProviderError(f"image download failed with HTTP {status}", transient=transient, status=status)


def _too_large(max_bytes: int) -> ProviderError:
    return ProviderError(f"image is larger than {max_bytes} bytes", transient=False)


def _network_error(error: Exception) -> ProviderError:
    return ProviderError(f"image download failed: {type(error).__name__}", transient=True)

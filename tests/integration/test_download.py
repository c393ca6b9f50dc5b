"""ImageDownloader against a real HTTP image host on loopback."""

from __future__ import annotations

import io
import ipaddress
import time

import httpx
import pytest
from PIL import Image

from services.image.providers import ImageDownloader, ProviderError
from services.image.providers import download
from services.image.providers.download import HostConnections, image_from_bytes, is_public_address
from tests.fakes.recraft import FakeRecraft, make_png

pytestmark = pytest.mark.timeout(30)

# A public address that nothing here can reach directly: requests to it only succeed
# through the fake acting as an HTTP proxy, which stands in for "the internet".
PUBLIC_IP = "93.184.216.34"


@pytest.fixture
async def host():
    async with FakeRecraft() as fake:
        yield fake


@pytest.fixture(params=["kept-connections", "one-shot-client"])
async def kept(request):
    """Each download test runs on both paths: the service's kept connections (HostConnections,
    httpcore's pools spoken to directly) and a one-shot httpx client (None)."""
    if request.param == "one-shot-client":
        yield None
        return
    connections = HostConnections()
    yield connections
    await connections.aclose()


def downloader(kept: HostConnections | None, **options) -> ImageDownloader:
    return ImageDownloader(connections=kept, **options)


def file_requests(fake: FakeRecraft) -> list:
    return [request for request in fake.requests if request.path.startswith("/files/")]


async def test_fetches_a_png_and_reads_its_real_size(host, kept):
    data = make_png(96, 48)
    image = await downloader(kept, allow_private=True).fetch(host.host_image(data))
    assert image.data == data
    assert (image.content_type, image.width, image.height) == ("image/png", 96, 48)


@pytest.mark.parametrize("fmt, content_type", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")])
async def test_other_image_formats_are_recognised_by_their_bytes(host, fmt, content_type, kept):
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(buffer, format=fmt)
    image = await downloader(kept, allow_private=True).fetch(host.host_image(buffer.getvalue()))
    assert (image.content_type, image.width, image.height) == (content_type, 30, 20)


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"])
async def test_loopback_is_refused_unless_allowed(host, hostname, kept):
    url = host.host_image(make_png()).replace("127.0.0.1", hostname)
    with pytest.raises(ProviderError, match="private or reserved") as raised:
        await downloader(kept, allow_private=False).fetch(url)
    assert raised.value.transient is False
    assert file_requests(host) == []


async def test_public_address_is_fetched_with_the_original_host_header(host):
    url = host.host_image(make_png()).replace(host.base_url, f"http://{PUBLIC_IP}")
    async with httpx.AsyncClient(proxy=host.base_url) as via_proxy:
        image = await ImageDownloader(client=via_proxy, allow_private=False).fetch(url)
    assert image.width == 64
    [request] = file_requests(host)
    assert request.headers["Host"] == PUBLIC_IP


async def test_redirect_from_public_to_loopback_is_refused(host):
    loopback_url = host.host_image(make_png())
    url = f"http://{PUBLIC_IP}/redirect-to?url={loopback_url}"
    async with httpx.AsyncClient(proxy=host.base_url) as via_proxy:
        with pytest.raises(ProviderError, match="private or reserved") as raised:
            await ImageDownloader(client=via_proxy, allow_private=False).fetch(url)
    assert raised.value.transient is False
    assert [request.path for request in host.requests] == ["/redirect-to"]


@pytest.mark.parametrize("hops", [1, 3])
async def test_redirects_are_followed_up_to_three(host, hops, kept):
    image_id = host.host_image(make_png()).rsplit("/", 1)[1].removesuffix(".png")
    image = await downloader(kept, allow_private=True).fetch(f"{host.base_url}/redirect/{hops}/{image_id}.png")
    assert image.width == 64
    assert len(host.requests) == hops + 1


async def test_more_than_three_redirects_are_refused(host, kept):
    image_id = host.host_image(make_png()).rsplit("/", 1)[1].removesuffix(".png")
    with pytest.raises(ProviderError, match="redirects") as raised:
        await downloader(kept, allow_private=True).fetch(f"{host.base_url}/redirect/4/{image_id}.png")
    assert raised.value.transient is False
    assert file_requests(host) == []


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://127.0.0.1:25/"])
async def test_redirect_to_another_scheme_is_refused(host, target, kept):
    with pytest.raises(ProviderError, match="http or https") as raised:
        await downloader(kept, allow_private=True).fetch(f"{host.base_url}/redirect-to?url={target}")
    assert raised.value.transient is False


@pytest.mark.parametrize("url", ["file:///etc/passwd", "data:image/png;base64,AAAA", "not a url", ""])
async def test_only_http_urls_are_fetched(url, kept):
    with pytest.raises(ProviderError) as raised:
        await downloader(kept, allow_private=True).fetch(url)
    assert raised.value.transient is False


async def test_declared_content_length_over_the_cap_is_refused(host, kept):
    with pytest.raises(ProviderError, match="larger than 100 bytes") as raised:
        await downloader(kept, allow_private=True, max_bytes=100).fetch(host.host_image(make_png()))
    assert raised.value.transient is False


async def test_streamed_body_over_the_cap_is_cut_off(host, kept):
    host.image_mode = "png_chunked"
    data = make_png(512, 512, (1, 2, 3)) + bytes(range(256)) * 40  # trailing bytes: still a PNG
    url = host.host_image(data)
    with pytest.raises(ProviderError, match="larger than 4000 bytes"):
        await downloader(kept, allow_private=True, max_bytes=4000).fetch(url)
    # The same stream under a roomier cap is accepted: the refusal above came from the cap.
    image = await downloader(kept, allow_private=True, max_bytes=len(data)).fetch(url)
    assert image.data == data


async def test_a_non_image_is_refused(host, kept):
    host.image_mode = "not_image"
    with pytest.raises(ProviderError, match="not an image") as raised:
        await downloader(kept, allow_private=True).fetch(host.host_image(make_png()))
    assert raised.value.transient is False


async def test_a_corrupt_image_is_refused(host, kept):
    broken = make_png(64, 64)[:60]  # PNG signature and header, then nothing
    with pytest.raises(ProviderError) as raised:
        await downloader(kept, allow_private=True).fetch(host.host_image(broken))
    assert raised.value.transient is False


async def test_5xx_is_transient_and_404_is_permanent(host, kept):
    url = host.host_image(make_png())
    host.fail_next(status=503, path_prefix="/files/")
    with pytest.raises(ProviderError) as raised:
        await downloader(kept, allow_private=True).fetch(url)
    assert (raised.value.status, raised.value.transient) == (503, True)
    with pytest.raises(ProviderError) as raised:
        await downloader(kept, allow_private=True).fetch(f"{host.base_url}/files/missing.png")
    assert (raised.value.status, raised.value.transient) == (404, False)


async def test_a_slow_host_hits_the_overall_deadline(host, kept):
    host.delay_seconds = 2
    started = time.monotonic()
    with pytest.raises(ProviderError, match="timed out") as raised:
        await downloader(kept, allow_private=True, timeout=0.3).fetch(host.host_image(make_png()))
    assert raised.value.transient is True
    assert time.monotonic() - started < 1.5


async def test_unreachable_host_is_transient(kept):
    fake = await FakeRecraft().start()
    url = fake.host_image(make_png())
    await fake.stop()
    with pytest.raises(ProviderError) as raised:
        await downloader(kept, allow_private=True).fetch(url)
    assert raised.value.transient is True


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.9", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:808:808::1", False),  # 6to4 at all: the tunnel's far end is the sender's choice
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("fec0::1", False),  # site-local
    ],
)
def test_public_address_classification(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_huge_canvas_is_refused_without_decoding():
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # ~4 KB on the wire, 25 Mpx
    with pytest.raises(ProviderError, match="pixels"):
        image_from_bytes(buffer.getvalue())


async def test_a_gzip_body_is_counted_decoded_and_cut_at_the_cap(host, kept):
    host.image_mode = "gzip"
    # A real PNG followed by 8 MB of zeros: about 8 KB on the wire.
    bomb = make_png(64, 64) + bytes(8 * 1024 * 1024)
    url = host.host_image(bomb)
    with pytest.raises(ProviderError, match="larger than 1048576 bytes") as raised:
        await downloader(kept, allow_private=True, max_bytes=1024 * 1024).fetch(url)
    assert raised.value.transient is False

    small = make_png(40, 30)
    image = await downloader(kept, allow_private=True).fetch(host.host_image(small))
    assert image.data == small and (image.width, image.height) == (40, 30)


async def test_a_pooled_connection_is_never_reused_for_another_download(host):
    first, second = host.host_image(make_png()), host.host_image(make_png())
    # One client for the process, as in production: a kept-alive connection pinned to an
    # address could otherwise serve the next download, whatever its host name.
    async with httpx.AsyncClient() as shared:
        downloader = ImageDownloader(client=shared, allow_private=True)
        await downloader.fetch(first)
        await downloader.fetch(second.replace("127.0.0.1", "localhost"))
    peers = [request.peer for request in file_requests(host)]
    assert len(peers) == 2 and peers[0] != peers[1]
    assert all(request.headers["Connection"].lower() == "close" for request in file_requests(host))


async def test_kept_connections_serve_one_host_name_each(host):
    images = [host.host_image(make_png()) for _ in range(3)]
    connections = HostConnections()
    try:
        downloader = ImageDownloader(allow_private=True, connections=connections)
        await downloader.fetch(images[0])
        await downloader.fetch(images[1])
        await downloader.fetch(images[2].replace("127.0.0.1", "localhost"))
    finally:
        await connections.aclose()
    peers = [request.peer for request in file_requests(host)]
    # The first connection served the second download; another name got its own.
    assert peers[0] == peers[1] and peers[2] != peers[0]
    assert [request.headers["Host"] for request in file_requests(host)] == [
        host.base_url.removeprefix("http://")
    ] * 2 + [host.base_url.removeprefix("http://").replace("127.0.0.1", "localhost")]


async def test_kept_connections_connect_to_the_checked_address_under_the_original_name(host, monkeypatch):
    # The name's checked address stands in for DNS (nothing here resolves a public name):
    # the download must connect there, never look the name up again, and say the name.
    checked = []

    async def resolve(url):
        checked.append(url.host)
        return ipaddress.ip_address("127.0.0.1")

    monkeypatch.setattr(download, "_resolve_public_address", resolve)
    port = host.base_url.rsplit(":", 1)[1]
    url = host.host_image(make_png()).replace(host.base_url, f"http://images.invalid:{port}")
    connections = HostConnections()
    try:
        image = await ImageDownloader(allow_private=False, connections=connections).fetch(url)
    finally:
        await connections.aclose()
    assert image.width == 64 and checked == ["images.invalid"]
    [request] = file_requests(host)
    assert request.headers["Host"] == f"images.invalid:{port}"

"""The downloader's replacement of h11's body extraction hands out the same bytes and leaves
h11 in the same state as h11's own, whatever the split of the bytes."""

from __future__ import annotations

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer

import services.image.providers.download  # noqa: F401 - installs the replacement


def test_the_replacement_is_installed():
    assert ReceiveBuffer.maybe_extract_at_most.__name__ == "_extract_at_most_without_copies"


def test_extracting_all_or_part_of_the_buffer():
    buffer = ReceiveBuffer()
    assert buffer.maybe_extract_at_most(10) is None
    buffer += b"abcdef"
    assert buffer.maybe_extract_at_most(4) == b"abcd" and bytes(buffer) == b"ef"
    assert buffer.maybe_extract_at_most(100) == b"ef" and len(buffer) == 0
    buffer += b"gh"  # a fresh buffer after handing the old one out
    assert buffer.maybe_extract_at_most(2) == b"gh" and buffer.maybe_extract_at_most(1) is None


@pytest.mark.parametrize("piece", [1, 7, 100, 4096, 10**6])
def test_a_response_read_in_pieces_gives_its_body_and_the_next_response(piece):
    body = bytes(range(256)) * 40
    first = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    wire = first + b"HTTP/1.1 204 No Content\r\n\r\n"
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    received, statuses = bytearray(), []
    for start in range(0, len(wire), piece):
        client.receive_data(wire[start : start + piece])
        while (event := client.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.Response):
                statuses.append(event.status_code)
            elif isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        if statuses and client.our_state is h11.DONE and client.their_state is h11.DONE:
            break
    assert statuses == [200] and bytes(received) == body
    # What h11 kept after the first response is exactly the start of the second.
    assert client.trailing_data[0] == wire[len(first) : len(first) + len(client.trailing_data[0])]

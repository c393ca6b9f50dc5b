"""What the fake image APIs share: cached PNGs of any size, and an outage switch.

`fail_next` (from FakeHttpServer) fails the next few requests and then recovers by itself;
`start_outage` fails every request until `end_outage`, for circuit breaker tests.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from typing import Any

from aiohttp import web
from PIL import Image

from tests.fakes.http_server import FakeHttpServer


@functools.lru_cache(maxsize=64)
def png_of_size(width: int, height: int, colour: tuple[int, int, int] = (90, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(width: int, height: int, colour: tuple[int, int, int] = (90, 20, 30)) -> str:
    return base64.b64encode(png_of_size(width, height, colour)).decode("ascii")


class ImageApiFake(FakeHttpServer):
    def __init__(self) -> None:
        super().__init__()
        self._outage: tuple[int, Any, dict[str, str]] | None = None

    def start_outage(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """Every request fails with `status` until end_outage()."""
        self._outage = (status, body, dict(headers or {}))

    def end_outage(self) -> None:
        self._outage = None

    def outage_response(self) -> web.Response | None:
        if self._outage is None:
            return None
        status, body, headers = self._outage
        if body is None or isinstance(body, str):
            return web.Response(status=status, text=body or "", headers=headers)
        return web.Response(status=status, text=json.dumps(body), headers=headers, content_type="application/json")

    def api_requests(self, path_part: str) -> list:
        return [request for request in self.requests if path_part in request.path]

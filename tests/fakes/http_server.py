"""A real HTTP server on 127.0.0.1:<free port> that records requests and plays scripted faults.

Subclasses add the routes of the API they imitate. The server runs in the test's event
loop (aiohttp.web), so a test can change its behaviour between calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # case-insensitive, as HTTP header names are
    body: bytes
    received_at: float = 0.0  # time.monotonic() when the request arrived
    peer: tuple | None = None  # the client's (host, port): one per TCP connection

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ScriptedFault:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    path_prefix: str = "/"


class FakeHttpServer:
    """Base for fake providers: `async with FakeX() as fake: fake.base_url ...`."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.delay_seconds = 0.0
        # Requests being answered right now, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self._faults: deque[ScriptedFault] = deque()
        self._runner: web.AppRunner | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        path_prefix: str = "/",
    ) -> None:
        """The next `count` requests under `path_prefix` get this status instead of an answer."""
        for _ in range(count):
            self._faults.append(ScriptedFault(status, body, dict(headers or {}), path_prefix))

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]

    async def start(self) -> FakeHttpServer:
        app = web.Application(middlewares=[self._record_and_script])
        self.add_routes(app)
        # A slow scripted answer must not hold up teardown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @web.middleware
    async def _record_and_script(self, request: web.Request, handler) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                CIMultiDict(request.headers),
                body,
                time.monotonic(),
                request.transport.get_extra_info("peername") if request.transport else None,
            )
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_seconds:
                await asyncio.sleep(self.delay_seconds)
            fault = self._take_fault(request.path) or self.fault_for(request.path, body)
            if fault is not None:
                return _fault_response(fault)
            return await handler(request)
        finally:
            self.in_flight -= 1

    def fault_for(self, path: str, body: bytes) -> ScriptedFault | None:
        """Subclasses may fail requests by their content (e.g. a prompt)."""
        return None

    def _take_fault(self, path: str) -> ScriptedFault | None:
        for fault in self._faults:
            if path.startswith(fault.path_prefix):
                self._faults.remove(fault)
                return fault
        return None


def _fault_response(fault: ScriptedFault) -> web.Response:
    if fault.body is None or isinstance(fault.body, str):
        return web.Response(status=fault.status, text=fault.body or "", headers=fault.headers)
    return web.json_response(fault.body, status=fault.status, headers=fault.headers)

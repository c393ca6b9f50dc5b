"""A Recraft-speaking fake that answers every generation at once (or after a fixed delay)
with one pre-made PNG, in a process of its own so that its work is not the bench's:
`python -m tests.bench.instant_recraft URL_FILE PNG_FILE DELAY_SECONDS`.

POST /v1/images/generations answers Recraft's documented {"created", "credits", "data":
[{"image_id", "url"}]}; the URL serves the PNG read from PNG_FILE at start-up. Nothing is
recorded or rendered per call, so the portrait bench measures the pipeline, not a painter.
Writes its base URL (the API base, ending in /v1) to URL_FILE once it listens.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

API_KEY = "bench-recraft-key"
GENERATIONS_PATH = "/v1/images/generations"


def app_for(png: bytes, delay_seconds: float) -> web.Application:
    async def generate(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.json_response({"code": "not_authenticated", "message": "Invalid API token"}, status=401)
        await request.read()
        if delay_seconds:
            await asyncio.sleep(delay_seconds)
        image_id = uuid.uuid4().hex
        host = request.headers.get("Host", "")
        item = {"image_id": image_id, "url": f"http://{host}/files/{image_id}.png"}
        return web.json_response({"created": int(time.time()), "credits": 40, "data": [item]})

    async def serve_file(_request: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    app = web.Application()
    app.router.add_post(GENERATIONS_PATH, generate)
    app.router.add_get("/files/{image_id}.png", serve_file)
    return app


async def serve(url_file: Path, png_file: Path, delay_seconds: float) -> None:
    runner = web.AppRunner(app_for(png_file.read_bytes(), delay_seconds), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    url_file.write_text(f"http://127.0.0.1:{port}/v1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])))

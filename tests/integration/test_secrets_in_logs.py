"""No log line of a running service shows the database or NATS password."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit, urlunsplit

from services.image.config import Config as ImageConfig
from services.image.main import build as build_image
from services.story.config import Config as StoryConfig
from services.story.main import build as build_story
from shared.logs import JsonFormatter
from tools.infra import free_port

TOKENS = "admin:t-admin,gateway:t-gateway,story:t-story,image:t-image"
NATS_PASSWORD = "nats-pa55word-xyz"
DB_PASSWORD = "db-pa55word-xyz"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_no_log_line_shows_a_password(database_url, s3_endpoint_url, s3_bucket):
    parts = urlsplit(database_url)
    # The test server trusts any password, so this one gets in while being a real secret.
    with_password = urlunsplit(parts._replace(netloc=f"{parts.username}:{DB_PASSWORD}@{parts.hostname}:{parts.port or 5432}"))
    # Nobody listens there: the services log their (failing) NATS connects over and over.
    nats_url = f"nats://casefile:{NATS_PASSWORD}@127.0.0.1:{free_port()}"
    env = {
        "DATABASE_URL": with_password,
        "NATS_URL": nats_url,
        "AUTH_TOKENS": TOKENS,
        "S3_ENDPOINT_URL": s3_endpoint_url,
        "S3_BUCKET": s3_bucket,
    }
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        async with contextlib.AsyncExitStack() as stack:
            story_addr = f"127.0.0.1:{free_port()}"
            await build_story(StoryConfig.from_env({**env, "STORY_ADDR": story_addr}), stack)
            await build_image(ImageConfig.from_env({**env, "IMAGE_ADDR": "127.0.0.1:0", "STORY_ADDR": story_addr}), stack)
            async with asyncio.timeout(20):
                while sum('"nats.connect_failed"' in line for line in handler.lines) < 4:
                    await asyncio.sleep(0.1)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)

    text = "\n".join(handler.lines)
    assert '"db.pool_created"' in text and '"nats.connect_failed"' in text
    assert NATS_PASSWORD not in text
    assert DB_PASSWORD not in text

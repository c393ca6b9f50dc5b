"""A fake OpenAI Images API that answers every call after a fixed delay, in a process of its
own (so its work is not the bench's): `python -m tests.bench.slow_provider URL_FILE DELAY`.
Writes its base URL to URL_FILE once it listens, and serves until killed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.fakes.openai_images import FakeOpenAIImages

API_KEY = "bench-openai-key"


async def serve(url_file: Path, delay: float) -> None:
    fake = FakeOpenAIImages(api_key=API_KEY)
    fake.delay_seconds = delay
    await fake.start()
    url_file.write_text(fake.api_base_url)
    while True:
        fake.requests.clear()  # a long bench must not keep every request it recorded
        await asyncio.sleep(5)


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), float(sys.argv[2])))

"""Story writers behind one interface, chosen by STORY_WRITER."""

from __future__ import annotations

import httpx

from services.story.writers.anthropic import DEFAULT_BASE_URL as ANTHROPIC_DEFAULT_BASE_URL
from services.story.writers.anthropic import AnthropicWriter
from services.story.writers.base import StoryWriter, WriterError
from services.story.writers.local import LocalWriter

__all__ = ["STORY_WRITERS", "AnthropicWriter", "LocalWriter", "StoryWriter", "WriterError", "build_writer"]

STORY_WRITERS = ("local", "anthropic")
ANTHROPIC_DEFAULT_MODEL = "claude-sonnet-4-5"


def build_writer(
    name: str,
    *,
    api_key: str | None,
    base_url: str | None,
    model: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> StoryWriter:
    """Builds the configured writer; configuration mistakes name the variable to fix.

    `client` is the process's one HTTP client, so calls reuse connections."""
    choice = name.strip().lower()
    if choice == "local":
        return LocalWriter()
    if choice == "anthropic":
        if not api_key:
            raise ValueError("ANTHROPIC_API_KEY is required when STORY_WRITER=anthropic")
        return AnthropicWriter(
            api_key, base_url or ANTHROPIC_DEFAULT_BASE_URL, model=model or ANTHROPIC_DEFAULT_MODEL, client=client
        )
    raise ValueError(f"STORY_WRITER: unknown writer {name!r}; expected one of {', '.join(STORY_WRITERS)}")

"""Story writers behind one interface, chosen by STORY_WRITER."""

from __future__ import annotations

import httpx

from services.story.writers.anthropic import AnthropicWriter
from services.story.writers.base import StoryWriter, WriterError
from services.story.writers.local import LocalWriter
from services.story.writers.openai import OpenAIWriter

__all__ = ["STORY_WRITERS", "AnthropicWriter", "LocalWriter", "OpenAIWriter", "StoryWriter", "WriterError", "build_writer"]

STORY_WRITERS = ("local", "anthropic", "openai")
# The variable that holds each model writer's key, for the message when it is missing.
KEY_VARIABLES = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


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
    if choice not in KEY_VARIABLES:
        raise ValueError(f"STORY_WRITER: unknown writer {name!r}; expected one of {', '.join(STORY_WRITERS)}")
    if not api_key:
        raise ValueError(f"{KEY_VARIABLES[choice]} is required when STORY_WRITER={choice}")
    writer_class = AnthropicWriter if choice == "anthropic" else OpenAIWriter
    return writer_class(api_key, base_url, model, client=client)

"""Fixtures of the generation-job tests: the stack, and the money audit after every test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_images import FakeOpenAIImages
from tests.integration.credits.helpers import assert_ledger_holds

from .helpers import JobsStack, money_problems, serve_jobs


@pytest.fixture(autouse=True)
async def money_holds_after_the_test(database_url: str) -> AsyncIterator[None]:
    """The ledger's own rules, and no charge without a job nor a job without a charge."""
    yield
    await assert_ledger_holds(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        problems = await money_problems(conn)
    finally:
        await conn.close()
    assert not problems, "\n".join(problems)


@pytest.fixture
async def stack(database_url, nats_server, s3_endpoint_url, s3_bucket, auth_tokens) -> AsyncIterator[JobsStack]:
    async with serve_jobs(
        database_url=database_url, nats_url=nats_server.url, s3_endpoint_url=s3_endpoint_url, s3_bucket=s3_bucket,
        tokens=auth_tokens,
    ) as running:  # fmt: skip
        yield running


@pytest.fixture
def serve(database_url, nats_server, s3_endpoint_url, s3_bucket, auth_tokens):
    """serve(**options) -> the stack as an async context manager, for tests that set it up their own way."""

    def start(**options):
        return serve_jobs(
            database_url=database_url, nats_url=nats_server.url, s3_endpoint_url=s3_endpoint_url, s3_bucket=s3_bucket,
            tokens=auth_tokens, **options,
        )  # fmt: skip

    return start


@pytest.fixture
async def openai():
    async with FakeOpenAIImages() as fake:
        yield fake


@pytest.fixture
async def openai_stack(serve, openai) -> AsyncIterator[JobsStack]:
    async with serve(OPENAI_API_KEY=openai.api_key, OPENAI_BASE_URL=openai.api_base_url, proxies=True) as running:
        yield running


@pytest.fixture
async def gemini():
    async with FakeGemini() as fake:
        yield fake


@pytest.fixture
async def gemini_stack(serve, gemini) -> AsyncIterator[JobsStack]:
    async with serve(GEMINI_API_KEY=gemini.api_key, GEMINI_BASE_URL=gemini.api_base_url) as running:
        yield running

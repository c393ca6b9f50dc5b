"""The credits service as a real process: `python -m services.credits.main`."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from shared.auth import bearer_metadata

from .helpers import service_env as credits_env


def log_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def wait_for_exit(process, timeout: float = 15.0) -> int | None:
    async with asyncio.timeout(timeout):
        while process.is_running():
            await asyncio.sleep(0.05)
    return process.returncode


async def test_process_serves_and_stops_cleanly_on_sigterm(
    start_service, database_url, auth_tokens
):
    env = credits_env(database_url, auth_tokens)
    process = start_service("credits", env)
    await process.wait_healthy(env["CREDITS_ADDR"])

    async with grpc.aio.insecure_channel(env["CREDITS_ADDR"]) as channel:
        reply = await pb_grpc.CreditsServiceStub(channel).GetAccount(
            pb.GetAccountRequest(user_id="process-user"),
            metadata=bearer_metadata(auth_tokens["gateway"]),
            timeout=10,
        )
    exit_code = await process.terminate_async(grace=10)

    assert reply.account.balance == 1000
    assert exit_code == 0
    tail = process.log_tail(lines=200)
    events = [line["event"] for line in log_events(tail)]
    assert "service.started" in events
    assert events[-1] == "service.stopped"
    assert not any(token in tail for token in auth_tokens.values())


@pytest.mark.parametrize("auth_tokens_value", [None, "gateway"], ids=["missing", "malformed"])
async def test_process_without_valid_auth_tokens_exits_2_naming_the_variable(
    start_service, database_url, auth_tokens, auth_tokens_value
):
    env = credits_env(database_url, auth_tokens)
    if auth_tokens_value is None:
        del env["AUTH_TOKENS"]
    else:
        env["AUTH_TOKENS"] = auth_tokens_value

    process = start_service("credits", env)
    exit_code = await wait_for_exit(process)

    assert exit_code == 2
    events = log_events(process.log_tail())
    failures = [line for line in events if line["event"] == "config.rejected"]
    assert len(failures) == 1
    assert failures[0]["error"].startswith("AUTH_TOKENS: ")


async def test_an_unknown_log_level_exits_2_naming_the_variable_in_json(start_service, database_url, auth_tokens):
    env = {**credits_env(database_url, auth_tokens), "LOG_LEVEL": "LOUD"}

    process = start_service("credits", env)

    assert await wait_for_exit(process) == 2
    failures = [line for line in log_events(process.log_tail()) if line["event"] == "config.rejected"]
    assert [line["error"] for line in failures] == ["LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, not 'LOUD'"]

"""The per-user token bucket on Charge: RESOURCE_EXHAUSTED with RetryInfo, state in PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.grpc_errors import details_of

from .helpers import credits_client, serve_credits, service_env


@pytest.fixture
async def slow_credits(database_url, auth_tokens):
    """A bucket of 3 charges that refills one charge every 4 seconds."""
    async with serve_credits(database_url, auth_tokens, CHARGE_RATE_PER_SECOND="0.25", CHARGE_BURST="3") as service:
        yield service


def charge_request(request_id: str, user_id: str = "u") -> pb.ChargeRequest:
    return pb.ChargeRequest(user_id=user_id, amount=10, reference="job:1", request_id=request_id)


async def test_over_the_burst_is_resource_exhausted_with_retry_info_and_charges_nothing(slow_credits, db):
    for n in range(3):
        await slow_credits.charge("u", 10, f"c-{n}")

    details = await slow_credits.refused("Charge", charge_request("c-3"), "image")

    assert (details.code, details.reason, details.domain) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", "credits.casefile"
    )
    assert details.retry_after_seconds is not None and 0 < details.retry_after_seconds <= 4
    assert (await slow_credits.account("u")).balance == 970
    assert await db.fetchval("SELECT count(*) FROM credits.requests WHERE request_id = 'c-3'") == 0


async def test_refused_charges_take_tokens_too(slow_credits):
    too_dear = await slow_credits.refused("Charge", pb.ChargeRequest(user_id="u", amount=5000, reference="job:1",
                                                                     request_id="too-dear"), "image")
    for n in range(2):
        await slow_credits.charge("u", 10, f"c-{n}")

    limited = await slow_credits.refused("Charge", charge_request("c-2"), "image")

    assert (too_dear.reason, limited.reason) == ("INSUFFICIENT_CREDITS", "RATE_LIMITED")


async def test_replays_take_no_token(slow_credits):
    first = await slow_credits.charge("u", 10, "c-0")

    replays = [await slow_credits.charge("u", 10, "c-0") for _ in range(10)]
    others = [await slow_credits.charge("u", 10, f"c-{n}") for n in (1, 2)]

    assert {(replay.charge_id, replay.balance) for replay in replays} == {(first.charge_id, 990)}
    assert [other.balance for other in others] == [980, 970]


async def test_each_user_has_a_bucket_of_their_own(slow_credits):
    for n in range(3):
        await slow_credits.charge("busy", 10, f"busy-{n}")

    other = await slow_credits.charge("quiet", 10, "quiet-0")
    busy = await slow_credits.refused("Charge", charge_request("busy-3", user_id="busy"), "image")

    assert other.balance == 990
    assert busy.reason == "RATE_LIMITED"


async def test_the_bucket_refills_with_time_and_a_limited_request_id_can_be_retried(slow_credits, db):
    for n in range(3):
        await slow_credits.charge("u", 10, f"c-{n}")
    limited = await slow_credits.refused("Charge", charge_request("c-3"), "image")
    # Eight seconds pass for the bucket (rather than for the test): two tokens come back.
    await db.execute("UPDATE credits.accounts SET charge_tokens_at = charge_tokens_at - interval '8 seconds'")

    retried = await slow_credits.charge("u", 10, "c-3")
    fourth = await slow_credits.charge("u", 10, "c-4")
    empty_again = await slow_credits.refused("Charge", charge_request("c-5"), "image")

    assert limited.reason == "RATE_LIMITED"
    assert (retried.balance, fourth.balance) == (960, 950)
    assert empty_again.reason == "RATE_LIMITED"


async def test_concurrent_charges_take_exactly_the_burst(database_url, auth_tokens):
    async with serve_credits(database_url, auth_tokens, CHARGE_RATE_PER_SECOND="0.001", CHARGE_BURST="25") as credits:
        results = await asyncio.gather(
            *(credits.charge("u", 1, f"c-{n}") for n in range(60)), return_exceptions=True
        )

    charged = [result for result in results if isinstance(result, pb.ChargeResponse)]
    limited = {details_of(result).reason for result in results if isinstance(result, grpc.aio.AioRpcError)}
    assert len(charged) == 25 and limited == {"RATE_LIMITED"}


async def test_the_bucket_holds_across_two_credits_processes(start_service, database_url, auth_tokens):
    env = service_env(database_url, auth_tokens, CHARGE_RATE_PER_SECOND="0.01", CHARGE_BURST="4")
    other_env = {**env, "CREDITS_ADDR": service_env(database_url, auth_tokens)["CREDITS_ADDR"]}
    first, second = start_service("credits", env), start_service("credits", other_env)
    await first.wait_healthy(env["CREDITS_ADDR"])
    await second.wait_healthy(other_env["CREDITS_ADDR"])

    async with credits_client(env["CREDITS_ADDR"], auth_tokens) as one, \
            credits_client(other_env["CREDITS_ADDR"], auth_tokens) as two:
        answers = [await (one if n % 2 else two).charge("u", 10, f"c-{n}") for n in range(4)]
        from_one = await one.refused("Charge", charge_request("c-4"), "image")
        from_two = await two.refused("Charge", charge_request("c-5"), "image")

    assert [answer.balance for answer in answers] == [990, 980, 970, 960]
    assert from_one.reason == from_two.reason == "RATE_LIMITED"

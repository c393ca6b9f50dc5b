"""Grant: credits added once per request_id, never past the balance limit."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb

from .helpers import count_rows

MAX_AMOUNT = 10**12


async def test_a_grant_adds_credits_once_and_its_replay_answers_the_first_account(credits, db):
    first = await credits.grant("u", 500, "grant-1", reason="support gesture")
    await credits.charge("u", 200, "charge-1")

    replay, trailers = await credits.call_with_trailers(
        "Grant", pb.GrantRequest(user_id="u", amount=500, reason="support gesture", request_id="grant-1")
    )
    reused = await credits.refused("Grant", pb.GrantRequest(user_id="u", amount=501, reason="support gesture",
                                                            request_id="grant-1"))

    assert first.balance == 1500
    assert replay.account == first and trailers.get("idempotent-replayed") == "true"
    assert (reused.code, reused.fields, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, ("request_id",),
                                                           "REQUEST_ID_REUSED")
    assert (await credits.account("u")).balance == 1300
    grants = await db.fetch("SELECT amount, reference FROM credits.ledger_entries WHERE request_id = 'grant-1'")
    assert [tuple(row) for row in grants] == [(500, "support gesture")]


async def test_a_grant_past_the_balance_limit_is_refused_and_remembered(credits, db):
    gate = asyncio.Semaphore(16)

    async def grant(n: int) -> None:
        async with gate:
            await credits.grant("whale", MAX_AMOUNT, f"big-{n}")

    await asyncio.gather(*(grant(n) for n in range(999)))  # 999 * 10^12 + the welcome 1000
    rows_before = await count_rows(db)

    refused = await credits.refused("Grant", pb.GrantRequest(user_id="whale", amount=MAX_AMOUNT, reason="more",
                                                             request_id="one-too-many"))
    still_fits = await credits.grant("whale", MAX_AMOUNT - 1000, "up-to-the-limit")
    replay = await credits.refused("Grant", pb.GrantRequest(user_id="whale", amount=MAX_AMOUNT, reason="more",
                                                            request_id="one-too-many"))

    assert (refused.code, refused.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert refused.metadata["limit"] == str(10**15)
    assert still_fits.balance == 10**15
    assert (replay.reason, replay.metadata["replayed"]) == ("BALANCE_LIMIT_EXCEEDED", "true")
    after = await count_rows(db)
    assert after["ledger_entries"] == rows_before["ledger_entries"] + 1


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"amount": 0}, ("amount",)),
        ({"amount": MAX_AMOUNT + 1}, ("amount",)),
        ({"reason": ""}, ("reason",)),
        ({"reason": "tab\there"}, ("reason",)),
        ({"request_id": ""}, ("request_id",)),
        ({"user_id": "u\n"}, ("user_id",)),
    ],
)
async def test_bad_grant_is_invalid_argument_and_writes_nothing(credits, db, request_fields, fields):
    request = {"user_id": "u", "amount": 100, "reason": "r", "request_id": "g-1", **request_fields}

    details = await credits.refused("Grant", pb.GrantRequest(**request))

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, fields)
    assert sum((await count_rows(db)).values()) == 0

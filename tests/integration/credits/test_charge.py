"""Charge: atomic, never below zero, idempotent per request_id, refusals remembered."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.grpc_errors import details_of

from .helpers import count_rows

ONE_CREDIT = 100


async def test_charge_takes_the_amount_and_writes_one_entry(credits, db):
    response, trailers = await credits.call_with_trailers(
        "Charge", pb.ChargeRequest(user_id="u", amount=300, reference="job:7", request_id="charge-1"), "image"
    )

    assert uuid.UUID(response.charge_id)
    assert response.balance == 700
    assert "idempotent-replayed" not in trailers
    assert (await credits.account("u")).balance == 700
    entry = await db.fetchrow("SELECT * FROM credits.ledger_entries WHERE entry_id = $1::uuid", response.charge_id)
    assert (entry["kind"], entry["amount"], entry["balance_after"], entry["reference"], entry["request_id"]) == (
        "CHARGE", -300, 700, "job:7", "charge-1"
    )


async def test_200_concurrent_charges_of_one_credit_against_50_credits_exactly_50_succeed(credits, db):
    await credits.grant("hot", 4000, "top-up-to-50-credits")  # 1000 welcome + 4000 = 50 credits

    results = await asyncio.gather(
        *(credits.charge("hot", ONE_CREDIT, f"burst-{n}", reference=f"job:{n}") for n in range(200)),
        return_exceptions=True,
    )

    charged = [result for result in results if isinstance(result, pb.ChargeResponse)]
    refused = [details_of(result) for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(charged) == 50 and len(refused) == 150
    # Each success saw its own balance: the charges went one after another, none twice.
    assert sorted(result.balance for result in charged) == list(range(0, 5000, 100))
    assert len({result.charge_id for result in charged}) == 50
    for details in refused:
        assert details.code == grpc.StatusCode.FAILED_PRECONDITION
        assert (details.reason, details.domain) == ("INSUFFICIENT_CREDITS", "credits.casefile")
        assert dict(details.metadata) == {"balance": "0", "cost": "100"}
        assert "balance 0" in details.message and "cost 100" in details.message
    assert (await credits.account("hot")).balance == 0
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'CHARGE'") == 50


async def test_replayed_request_id_returns_the_first_answer_and_moves_nothing(credits, db):
    first = await credits.charge("u", 300, "charge-1")
    await credits.charge("u", 200, "charge-2")
    rows_before = await count_rows(db)

    replay, trailers = await credits.call_with_trailers(
        "Charge", pb.ChargeRequest(user_id="u", amount=300, reference="job:1", request_id="charge-1"), "image"
    )

    assert (replay.charge_id, replay.balance) == (first.charge_id, 700)
    assert trailers.get("idempotent-replayed") == "true"
    assert (await credits.account("u")).balance == 500
    assert await count_rows(db) == rows_before


async def test_twenty_concurrent_copies_of_one_charge_charge_once(credits, db):
    answers = await asyncio.gather(*(credits.charge("u", 250, "same-request") for _ in range(20)))

    assert {(answer.charge_id, answer.balance) for answer in answers} == {(answers[0].charge_id, 750)}
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'CHARGE'") == 1
    assert (await credits.account("u")).balance == 750


@pytest.mark.parametrize(
    "other",
    [
        {"amount": 301},
        {"reference": "job:2"},
        {"user_id": "someone-else"},
    ],
    ids=["other-amount", "other-reference", "other-user"],
)
async def test_request_id_reused_with_other_arguments_is_invalid_argument_and_writes_nothing(credits, db, other):
    await credits.charge("u", 300, "charge-1", reference="job:1")
    rows_before = await count_rows(db)
    request = {"user_id": "u", "amount": 300, "reference": "job:1", "request_id": "charge-1", **other}

    details = await credits.refused("Charge", pb.ChargeRequest(**request), "image")

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ("request_id",)
    assert details.reason == "REQUEST_ID_REUSED"
    assert details.metadata["first_operation"] == "CHARGE"
    assert await count_rows(db) == rows_before
    assert (await credits.account("u")).balance == 700


async def test_request_id_of_another_method_is_reused(credits, db):
    await credits.grant("u", 500, "shared-key")
    welcome = await credits.refused("Charge", pb.ChargeRequest(user_id="u", amount=1, reference="r",
                                                               request_id="welcome:u"), "image")
    rows_before = await count_rows(db)

    details = await credits.refused("Charge", pb.ChargeRequest(user_id="u", amount=1, reference="r",
                                                               request_id="shared-key"), "image")

    assert (details.reason, details.metadata["first_operation"]) == ("REQUEST_ID_REUSED", "GRANT")
    assert (welcome.reason, welcome.metadata["first_operation"]) == ("REQUEST_ID_REUSED", "WELCOME_GRANT")
    assert await count_rows(db) == rows_before


async def test_refusal_for_a_short_balance_is_the_answer_even_after_a_grant(credits, db):
    first = await credits.refused("Charge", pb.ChargeRequest(user_id="u", amount=2000, reference="job:1",
                                                             request_id="too-dear"), "image")
    await credits.grant("u", 5000, "top-up")

    replay = await credits.refused("Charge", pb.ChargeRequest(user_id="u", amount=2000, reference="job:1",
                                                              request_id="too-dear"), "image")
    fresh = await credits.charge("u", 2000, "too-dear-again")

    assert (first.code, first.reason, dict(first.metadata)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS", {"balance": "1000", "cost": "2000"}
    )
    assert (replay.code, replay.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS")
    assert dict(replay.metadata) == {"balance": "1000", "cost": "2000", "replayed": "true"}
    assert fresh.balance == 4000
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'CHARGE'") == 1


async def test_charge_for_a_user_never_seen_opens_the_account_first(credits):
    response = await credits.charge("newcomer", 150, "first-ever")

    assert response.balance == 850
    assert (await credits.account("newcomer")).balance == 850


async def test_the_largest_amount_moves_exactly(credits):
    await credits.grant("whale", 10**12, "big")

    response = await credits.charge("whale", 10**12, "all-of-it")

    assert response.balance == 1000


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"amount": 0}, ("amount",)),
        ({"amount": -100}, ("amount",)),
        ({"amount": 10**12 + 1}, ("amount",)),
        ({"amount": 2**63 - 1}, ("amount",)),
        ({"amount": -(2**63)}, ("amount",)),
        ({"user_id": ""}, ("user_id",)),
        ({"user_id": " u"}, ("user_id",)),
        ({"user_id": "u\x00"}, ("user_id",)),
        ({"user_id": "u" * 129}, ("user_id",)),
        ({"reference": ""}, ("reference",)),
        ({"reference": "job:\n1"}, ("reference",)),
        ({"request_id": ""}, ("request_id",)),
        ({"request_id": "r\u2028"}, ("request_id",)),
        ({"user_id": "", "amount": 0, "reference": "", "request_id": ""}, ("user_id", "amount", "reference", "request_id")),
    ],
)
async def test_bad_charge_is_invalid_argument_naming_each_field_and_writes_nothing(credits, db, request_fields, fields):
    request = {"user_id": "u", "amount": 100, "reference": "job:1", "request_id": "r1", **request_fields}

    details = await credits.refused("Charge", pb.ChargeRequest(**request), "image")

    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == fields
    assert details.message.startswith(f"{fields[0]}: ")
    assert sum((await count_rows(db)).values()) == 0


async def test_a_replayed_refusal_carries_the_replay_trailer_and_the_first_does_not(credits):
    request = pb.ChargeRequest(user_id="u-trailer", amount=5000, reference="job:t", request_id="too-dear-t")

    async def trailers_of_refusal() -> dict[str, str]:
        call = credits.stub.Charge(request, metadata=credits.as_caller("image"))
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        return dict(await call.trailing_metadata() or ())

    first, replay = await trailers_of_refusal(), await trailers_of_refusal()

    assert "idempotent-replayed" not in first and replay.get("idempotent-replayed") == "true"
    assert "grpc-status-details-bin" in replay  # the rich error still travels beside it

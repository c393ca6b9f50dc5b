"""Refund: at most the charge in all, once per request_id, keyed on the charge's user."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.grpc_errors import details_of

from .helpers import count_rows


async def test_refunds_give_back_at_most_the_charge_over_several_calls(credits, db):
    charge = await credits.charge("u", 600, "charge-1")

    first = await credits.refund(charge.charge_id, 200, "refund-1")
    second = await credits.refund(charge.charge_id, 400, "refund-2")
    beyond = await credits.refused("Refund", pb.RefundRequest(charge_id=charge.charge_id, amount=1, reason="again",
                                                              request_id="refund-3"), "image")

    assert (first.balance, second.balance) == (600, 1000)
    assert first.refund_id != second.refund_id
    assert (beyond.code, beyond.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REFUND_EXCEEDS_CHARGE")
    assert dict(beyond.metadata) == {"charge_id": charge.charge_id, "charged": "600", "refunded": "600",
                                     "requested": "1"}
    assert (await credits.account("u")).balance == 1000
    rows = await db.fetch("SELECT amount, refund_of::text, reference FROM credits.ledger_entries WHERE kind = 'REFUND'"
                          " ORDER BY seq")
    assert [tuple(row) for row in rows] == [(200, charge.charge_id, "provider failed"),
                                             (400, charge.charge_id, "provider failed")]


async def test_more_than_is_left_is_refused_and_nothing_moves(credits, db):
    charge = await credits.charge("u", 500, "charge-1")
    await credits.refund(charge.charge_id, 300, "refund-1")
    rows_before = await count_rows(db)

    details = await credits.refused("Refund", pb.RefundRequest(charge_id=charge.charge_id, amount=201, reason="r",
                                                               request_id="refund-2"), "image")

    assert details.reason == "REFUND_EXCEEDS_CHARGE"
    assert "at most 200" in details.message
    assert (await credits.account("u")).balance == 800
    # The refusal is the answer to refund-2: recorded, nothing else.
    after = await count_rows(db)
    assert after["ledger_entries"] == rows_before["ledger_entries"]
    assert after["requests"] == rows_before["requests"] + 1


async def test_replayed_refund_refunds_once_and_returns_the_first_answer(credits, db):
    charge = await credits.charge("u", 500, "charge-1")
    first = await credits.refund(charge.charge_id, 100, "refund-1")

    replay, trailers = await credits.call_with_trailers(
        "Refund", pb.RefundRequest(charge_id=charge.charge_id, amount=100, reason="provider failed",
                                   request_id="refund-1"), "image"
    )

    assert (replay.refund_id, replay.balance) == (first.refund_id, 600)
    assert trailers.get("idempotent-replayed") == "true"
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'REFUND'") == 1


async def test_concurrent_refunds_never_pass_the_charge(credits, db):
    charge = await credits.charge("u", 1000, "charge-all")

    results = await asyncio.gather(
        *(credits.refund(charge.charge_id, 100, f"refund-{n}") for n in range(25)), return_exceptions=True
    )

    refunded = [result for result in results if isinstance(result, pb.RefundResponse)]
    refused = [details_of(result) for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(refunded) == 10
    assert {details.reason for details in refused} == {"REFUND_EXCEEDS_CHARGE"} and len(refused) == 15
    assert sorted(result.balance for result in refunded) == list(range(100, 1100, 100))
    assert (await credits.account("u")).balance == 1000


async def test_twenty_concurrent_copies_of_one_refund_refund_once(credits, db):
    charge = await credits.charge("u", 1000, "charge-1")

    answers = await asyncio.gather(*(credits.refund(charge.charge_id, 300, "one-refund") for _ in range(20)))

    assert len({(answer.refund_id, answer.balance) for answer in answers}) == 1
    assert await db.fetchval("SELECT count(*) FROM credits.ledger_entries WHERE kind = 'REFUND'") == 1
    assert (await credits.account("u")).balance == 300


async def test_two_users_refunds_with_the_same_request_id_do_not_collide(credits, db):
    alice = await credits.charge("alice", 400, "alice-charge")
    bob = await credits.charge("bob", 300, "bob-charge")

    alice_refund = await credits.refund(alice.charge_id, 400, "refund-job-1")
    bob_refund = await credits.refund(bob.charge_id, 300, "refund-job-1")

    assert (alice_refund.balance, bob_refund.balance) == (1000, 1000)
    assert alice_refund.refund_id != bob_refund.refund_id
    owners = await db.fetch("SELECT user_id FROM credits.ledger_entries WHERE kind = 'REFUND' ORDER BY user_id")
    assert [row["user_id"] for row in owners] == ["alice", "bob"]


@pytest.mark.parametrize(
    "other", [{"amount": 101}, {"reason": "another reason"}, {"charge": "second"}], ids=["amount", "reason", "charge"]
)
async def test_refund_request_id_reused_with_other_arguments_is_invalid_argument(credits, db, other):
    first_charge = await credits.charge("u", 300, "charge-1")
    second_charge = await credits.charge("u", 300, "charge-2")
    await credits.refund(first_charge.charge_id, 100, "refund-1", reason="provider failed")
    rows_before = await count_rows(db)
    charge_id = second_charge.charge_id if other.pop("charge", None) else first_charge.charge_id
    request = {"charge_id": charge_id, "amount": 100, "reason": "provider failed", "request_id": "refund-1", **other}

    details = await credits.refused("Refund", pb.RefundRequest(**request), "image")

    assert (details.code, details.fields, details.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, ("request_id",), "REQUEST_ID_REUSED"
    )
    assert await count_rows(db) == rows_before


@pytest.mark.parametrize(
    "charge_id",
    [str(uuid.uuid4()), "not-a-uuid", "00000000-0000-0000-0000-000000000000"],
    ids=["unknown-uuid", "not-a-uuid", "nil-uuid"],
)
async def test_unknown_charge_is_not_found(credits, db, charge_id):
    await credits.account("u")
    rows_before = await count_rows(db)

    details = await credits.refused("Refund", pb.RefundRequest(charge_id=charge_id, amount=1, reason="r",
                                                               request_id="refund-1"), "admin")

    assert (details.code, details.reason, details.metadata["charge_id"]) == (
        grpc.StatusCode.NOT_FOUND, "CHARGE_NOT_FOUND", charge_id
    )
    assert await count_rows(db) == rows_before


async def test_a_grant_is_no_charge_to_refund(credits, db):
    await credits.account("u")
    grant_id = await db.fetchval("SELECT entry_id::text FROM credits.ledger_entries WHERE user_id = 'u'")

    details = await credits.refused("Refund", pb.RefundRequest(charge_id=grant_id, amount=1, reason="r",
                                                               request_id="refund-1"))

    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "CHARGE_NOT_FOUND")
    assert (await credits.account("u")).balance == 1000


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"charge_id": ""}, ("charge_id",)),
        ({"charge_id": "\x00"}, ("charge_id",)),
        ({"amount": 0}, ("amount",)),
        ({"amount": -5}, ("amount",)),
        ({"amount": 2**63 - 1}, ("amount",)),
        ({"reason": ""}, ("reason",)),
        ({"reason": "bell\x07"}, ("reason",)),
        ({"reason": "x" * 501}, ("reason",)),
        ({"request_id": ""}, ("request_id",)),
        ({"request_id": "r "}, ("request_id",)),
    ],
)
async def test_bad_refund_is_invalid_argument_naming_the_field(credits, db, request_fields, fields):
    charge = await credits.charge("u", 300, "charge-1")
    rows_before = await count_rows(db)
    request = {"charge_id": charge.charge_id, "amount": 100, "reason": "r", "request_id": "refund-1", **request_fields}

    details = await credits.refused("Refund", pb.RefundRequest(**request), "image")

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, fields)
    assert await count_rows(db) == rows_before

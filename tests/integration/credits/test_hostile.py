"""Hypothesis against the real server: hostile requests to every method never get INTERNAL or
UNKNOWN, random sequences of money movements agree with a model, and the ledger holds after
every example."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.grpc_errors import details_of

from .helpers import assert_ledger_holds, serve_credits

CALLERS = ("admin", "image", "gateway", "story")
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CODES_WITH_A_REASON = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.NOT_FOUND}

# protobuf strings are UTF-8, so lone surrogates cannot even be sent; everything else can.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
nasty_text = st.sampled_from([
    "", " ", "\x00", "u\x00", "\t", "\n", "\r\n", "\x7f", "\x1b[31m", "\u2028", "\u0085", "\ufeff", "é", "🙂" * 40,
    "x" * 128, "x" * 129, "x" * 100_000, "welcome:u1", "../../etc/passwd", "'; DROP TABLE credits.accounts; --",
    "%s%n", "null", "00000000-0000-0000-0000-000000000000", str(uuid.UUID(int=1)),
])
user_ids = st.one_of(st.sampled_from(["u1", "u2", "u3"]), nasty_text, any_text)
request_ids = st.one_of(st.sampled_from(["r1", "r2", "r3", "welcome:u1"]), nasty_text, any_text)
texts = st.one_of(st.sampled_from(["job:1", "a reason"]), nasty_text, any_text)
int64s = st.one_of(
    st.sampled_from([0, 1, -1, 100, 10**12, 10**12 + 1, 10**15, 2**50, 2**50 + 1, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-1000, 5000),
)
int32s = st.one_of(st.sampled_from([0, 1, -1, 10, 100, 101, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
page_tokens = st.one_of(
    texts,
    # Well-formed tokens of u1's list, with any number in them.
    st.builds(
        lambda seq: base64.urlsafe_b64encode(
            json.dumps({"u": hashlib.sha256(b"u1").hexdigest()[:16], "s": seq}).encode()
        ).decode(),
        st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=5)),
    ),
    st.binary(max_size=64).map(lambda raw: base64.urlsafe_b64encode(raw).decode()),
    st.builds(lambda payload: base64.urlsafe_b64encode(payload.encode()).decode(), any_text),
)

REQUESTS = {
    "GetAccount": st.builds(pb.GetAccountRequest, user_id=user_ids),
    "Grant": st.builds(pb.GrantRequest, user_id=user_ids, amount=int64s, reason=texts, request_id=request_ids),
    "SetPlan": st.builds(pb.SetPlanRequest, user_id=user_ids, plan=int32s),
    "Charge": st.builds(pb.ChargeRequest, user_id=user_ids, amount=int64s, reference=texts, request_id=request_ids),
    "Refund": st.builds(pb.RefundRequest, charge_id=texts, amount=int64s, reason=texts, request_id=request_ids),
    "ReserveStorage": st.builds(pb.ReserveStorageRequest, user_id=user_ids, bytes=int64s, request_id=request_ids),
    "ReleaseStorage": st.builds(pb.ReleaseStorageRequest, user_id=user_ids, bytes=int64s, request_id=request_ids),
    "RecordGeneration": st.builds(
        pb.RecordGenerationRequest, user_id=user_ids, job_id=texts, model=texts, images_requested=int32s,
        images_delivered=int32s, bytes_stored=int64s, request_id=st.one_of(st.just(""), request_ids),
    ),
    "GetUsage": st.builds(pb.GetUsageRequest, user_id=user_ids),
    "ListLedgerEntries": st.builds(pb.ListLedgerEntriesRequest, user_id=user_ids, page_size=int32s,
                                   page_token=page_tokens),
}


@pytest.mark.parametrize("method", sorted(REQUESTS))
@settings(max_examples=40)
@given(data=st.data())
async def test_hostile_requests_never_get_internal_or_unknown(credits, database_url, method, data):
    request = data.draw(REQUESTS[method], label="request")
    caller = data.draw(st.sampled_from(CALLERS), label="caller")

    try:
        await credits.call(method, request, caller)
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code not in NEVER, f"{method} {request!r} -> {details}"
        if details.code == grpc.StatusCode.INVALID_ARGUMENT:
            assert details.violations, f"{method}: INVALID_ARGUMENT names no field: {details}"
        if details.code in CODES_WITH_A_REASON:
            assert details.reason and details.domain == "credits.casefile", f"{method}: no ErrorInfo: {details}"
    await assert_ledger_holds(database_url)


@pytest.mark.parametrize("method", sorted(REQUESTS))
@settings(max_examples=25)
@given(raw=st.one_of(st.binary(max_size=300), st.just(b"\x0a\x02\xff\xfe"), st.just(b"\xff" * 12)))
async def test_request_bytes_that_are_no_message_never_get_internal_or_unknown(credits, database_url, method, raw):
    call = credits.channel.unary_unary(f"/casefile.credits.v1.CreditsService/{method}")

    try:
        await call(raw, metadata=credits.as_caller("admin"), timeout=10)
    except grpc.aio.AioRpcError as error:
        details = details_of(error)
        assert details.code not in NEVER, f"{method} {raw!r} -> {details}"
    await assert_ledger_holds(database_url)


# ---------------------------------------------------------------------------- the model


@dataclass
class Model:
    """What the ledger must say after a sequence of calls, worked out in plain Python."""

    balances: dict[str, int] = field(default_factory=dict)
    charges: dict[str, tuple[str, int]] = field(default_factory=dict)  # charge_id -> (user, amount)
    refunded: dict[str, int] = field(default_factory=dict)
    # (user, request_id) -> (operation, arguments, answer); a charge's key also under (None, id)
    requests: dict[tuple[str | None, str], tuple[str, tuple, object]] = field(default_factory=dict)

    def balance(self, user: str) -> int:
        return self.balances.setdefault(user, 1000)


users = st.sampled_from(["alice", "bob", "carol"])
# Few enough keys that replays and reuses happen often, enough that fresh requests do too.
keys = st.integers(1, 12).map(lambda n: f"k{n}")
operations = st.one_of(
    st.tuples(st.just("grant"), users, st.integers(1, 1500), keys),
    st.tuples(st.just("charge"), users, st.integers(1, 1200), keys),
    st.tuples(st.just("refund"), st.integers(0, 20), st.integers(1, 400), keys),
    st.tuples(st.just("refund"), st.integers(0, 20), st.integers(1, 400), keys),
)


@pytest.fixture
async def unlimited_credits(database_url, auth_tokens):
    async with serve_credits(database_url, auth_tokens, CHARGE_RATE_PER_SECOND="1000000", CHARGE_BURST="1000000") as c:
        yield c


@settings(max_examples=60)
@given(steps=st.lists(operations, min_size=1, max_size=30))
async def test_random_money_movements_agree_with_the_model(unlimited_credits, database_url, steps):
    credits, model = unlimited_credits, Model()
    run = uuid.uuid4().hex[:8]  # every example starts from fresh users and keys

    async def outcome(call):
        try:
            return ("ok", await call)
        except grpc.aio.AioRpcError as error:
            details = details_of(error)
            return (details.reason or details.code.name, dict(details.metadata))

    for kind, target, amount, key in steps:
        request_id = f"{run}-{key}"
        if kind == "grant":
            user = f"{run}-{target}"
            got = await outcome(credits.grant(user, amount, request_id, reason="model"))
            expected = model_grant(model, user, amount, request_id)
            assert (got[0], got[1].balance if got[0] == "ok" else None) == expected
        elif kind == "charge":
            user = f"{run}-{target}"
            got = await outcome(credits.charge(user, amount, request_id, reference="model"))
            expected = model_charge(model, user, amount, request_id, got)
            assert got[0] == expected[0], (kind, user, amount, request_id, got, expected)
            if got[0] == "ok":
                assert got[1].balance == expected[1]
        else:
            if not model.charges:
                continue
            charge_id = sorted(model.charges)[target % len(model.charges)]
            got = await outcome(credits.refund(charge_id, amount, request_id, reason="model"))
            expected = model_refund(model, charge_id, amount, request_id)
            assert (got[0], got[1].balance if got[0] == "ok" else None) == expected

    for user, balance in model.balances.items():
        assert (await credits.account(user)).balance == balance
    await assert_ledger_holds(database_url)


def model_grant(model: Model, user: str, amount: int, request_id: str) -> tuple[str, int | None]:
    recorded = model.requests.get((user, request_id))
    if recorded is not None:
        return ("ok", recorded[2]) if recorded[:2] == ("grant", (amount,)) else ("REQUEST_ID_REUSED", None)
    model.balances[user] = model.balance(user) + amount
    model.requests[(user, request_id)] = ("grant", (amount,), model.balances[user])
    return ("ok", model.balances[user])


def model_charge(model: Model, user: str, amount: int, request_id: str, got) -> tuple[str, int | None]:
    recorded = model.requests.get((user, request_id)) or model.requests.get((None, request_id))
    if recorded is not None:
        same = recorded[:2] == ("charge", (user, amount))
        if not same:
            return ("REQUEST_ID_REUSED", None)
        return ("ok", recorded[2]) if recorded[2] != "INSUFFICIENT_CREDITS" else ("INSUFFICIENT_CREDITS", None)
    balance = model.balance(user)
    if amount > balance:
        model.requests[(user, request_id)] = ("charge", (user, amount), "INSUFFICIENT_CREDITS")
        model.requests[(None, request_id)] = model.requests[(user, request_id)]
        return ("INSUFFICIENT_CREDITS", None)
    model.balances[user] = balance - amount
    model.requests[(user, request_id)] = ("charge", (user, amount), model.balances[user])
    model.requests[(None, request_id)] = model.requests[(user, request_id)]
    if got[0] == "ok":
        model.charges[got[1].charge_id] = (user, amount)
    return ("ok", model.balances[user])


def model_refund(model: Model, charge_id: str, amount: int, request_id: str) -> tuple[str, int | None]:
    user, charged = model.charges[charge_id]
    recorded = model.requests.get((user, request_id))
    if recorded is not None:
        if recorded[:2] != ("refund", (charge_id, amount)):
            return ("REQUEST_ID_REUSED", None)
        return ("ok", recorded[2]) if recorded[2] != "REFUND_EXCEEDS_CHARGE" else ("REFUND_EXCEEDS_CHARGE", None)
    if amount > charged - model.refunded.get(charge_id, 0):
        model.requests[(user, request_id)] = ("refund", (charge_id, amount), "REFUND_EXCEEDS_CHARGE")
        return ("REFUND_EXCEEDS_CHARGE", None)
    model.refunded[charge_id] = model.refunded.get(charge_id, 0) + amount
    model.balances[user] = model.balance(user) + amount
    model.requests[(user, request_id)] = ("refund", (charge_id, amount), model.balances[user])
    return ("ok", model.balances[user])

"""ListLedgerEntries: newest first, paged, each entry's balance_after, tokens bound to their list."""

from __future__ import annotations

import base64
import hashlib
import json

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb


async def list_page(credits, user_id: str, page_size: int = 0, page_token: str = "") -> pb.ListLedgerEntriesResponse:
    request = pb.ListLedgerEntriesRequest(user_id=user_id, page_size=page_size, page_token=page_token)
    return await credits.call("ListLedgerEntries", request, "gateway")


async def every_entry(credits, user_id: str, page_size: int) -> list[pb.LedgerEntry]:
    entries, token = [], ""
    while True:
        page = await list_page(credits, user_id, page_size, token)
        assert len(page.entries) <= page_size
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


async def test_pages_walk_the_whole_ledger_newest_first_and_sum_to_the_balance(credits):
    await credits.grant("u", 500, "grant-1", reason="birthday")
    charges = [await credits.charge("u", 100 + n, f"charge-{n}", reference=f"job:{n}") for n in range(5)]
    await credits.refund(charges[0].charge_id, 50, "refund-1")

    entries = await every_entry(credits, "u", page_size=3)

    balance = (await credits.account("u")).balance
    kinds = [entry.kind for entry in entries]
    assert kinds == [pb.LEDGER_ENTRY_KIND_REFUND] + [pb.LEDGER_ENTRY_KIND_CHARGE] * 5 + [pb.LEDGER_ENTRY_KIND_GRANT] * 2
    assert len({entry.entry_id for entry in entries}) == 8
    assert sum(entry.amount for entry in entries) == balance
    assert entries[0].balance_after == balance
    # Read oldest first, each balance_after is the one before plus the entry's amount.
    running = 0
    for entry in reversed(entries):
        running += entry.amount
        assert entry.balance_after == running
    assert entries[0].refunded_charge_id == charges[0].charge_id
    assert (entries[1].reference, entries[1].request_id, entries[1].amount) == ("job:4", "charge-4", -104)
    assert entries[-1].request_id == "welcome:u" and entries[-1].amount == 1000
    assert entries[-2].reference == "birthday"


async def test_a_list_that_fits_one_page_has_no_next_token(credits):
    await credits.charge("u", 10, "c-1")

    page = await list_page(credits, "u", page_size=2)

    assert len(page.entries) == 2 and page.next_page_token == ""


async def test_page_size_zero_means_twenty_and_above_a_hundred_means_a_hundred(credits):
    for n in range(110):
        await credits.charge("u", 1, f"c-{n}")

    default = await list_page(credits, "u")
    capped = await list_page(credits, "u", page_size=1000)

    assert len(default.entries) == 20 and len(capped.entries) == 100


async def test_a_token_from_one_users_list_is_refused_for_another(credits):
    for n in range(3):
        await credits.charge("alice", 10, f"c-{n}")
    token = (await list_page(credits, "alice", page_size=1)).next_page_token

    details = await credits.refused("ListLedgerEntries",
                                    pb.ListLedgerEntriesRequest(user_id="bob", page_token=token), "gateway")

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("page_token",))
    assert "another user" in details.message


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


# The list owner's mark as the service writes it, so each token below is wrong in one way only.
OWNER_U = hashlib.sha256(b"u").hexdigest()[:16]


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "%%%%",
        "\x00",
        "x" * 5000,
        _token([1, 2]),
        _token({"u": OWNER_U, "s": "7"}),
        _token({"u": OWNER_U, "s": -3}),
        _token({"u": OWNER_U, "s": True}),
        _token({"u": OWNER_U, "s": 10**30}),
        _token({"u": OWNER_U, "s": 1e3}),
        _token({"s": 5}),
        _token({"u": OWNER_U}),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    ],
)
async def test_a_token_this_method_never_returned_is_invalid_argument(credits, token):
    details = await credits.refused("ListLedgerEntries",
                                    pb.ListLedgerEntriesRequest(user_id="u", page_token=token), "gateway")

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("page_token",))


async def test_negative_page_size_is_invalid_argument(credits):
    details = await credits.refused("ListLedgerEntries",
                                    pb.ListLedgerEntriesRequest(user_id="u", page_size=-1), "gateway")

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("page_size",))

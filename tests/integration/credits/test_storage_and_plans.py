"""ReserveStorage / ReleaseStorage within the plan's quota, and SetPlan."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb
from shared.grpc_errors import details_of

from .helpers import ONE_GIB, count_rows

MIB = 1024 * 1024


async def reserve(credits, user_id: str, size: int, request_id: str) -> pb.Account:
    request = pb.ReserveStorageRequest(user_id=user_id, bytes=size, request_id=request_id)
    return (await credits.call("ReserveStorage", request, "image")).account


async def release(credits, user_id: str, size: int, request_id: str) -> pb.Account:
    request = pb.ReleaseStorageRequest(user_id=user_id, bytes=size, request_id=request_id)
    return (await credits.call("ReleaseStorage", request, "image")).account


async def set_plan(credits, user_id: str, plan: int) -> pb.Account:
    return (await credits.call("SetPlan", pb.SetPlanRequest(user_id=user_id, plan=plan))).account


async def test_reservations_fill_the_quota_exactly_and_no_further(credits, db):
    half = await reserve(credits, "u", ONE_GIB // 2, "r-1")
    full = await reserve(credits, "u", ONE_GIB // 2, "r-2")

    details = await credits.refused(
        "ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=1, request_id="r-3"), "image"
    )

    assert (half.storage_used_bytes, full.storage_used_bytes, full.storage_quota_bytes) == (ONE_GIB // 2, ONE_GIB,
                                                                                             ONE_GIB)
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert dict(details.metadata) == {"used": str(ONE_GIB), "requested": "1", "quota": str(ONE_GIB)}
    assert (await credits.account("u")).storage_used_bytes == ONE_GIB


async def test_concurrent_reservations_never_pass_the_quota(credits, db):
    results = await asyncio.gather(
        *(reserve(credits, "u", 100 * MIB, f"image-{n}") for n in range(30)), return_exceptions=True
    )

    reserved = [result for result in results if isinstance(result, pb.Account)]
    refused = {details_of(result).reason for result in results if isinstance(result, grpc.aio.AioRpcError)}
    assert len(reserved) == 10 and refused == {"QUOTA_EXCEEDED"}
    assert (await credits.account("u")).storage_used_bytes == 1000 * MIB


async def test_storage_requests_are_idempotent_per_request_id(credits, db):
    first = await reserve(credits, "u", 5 * MIB, "reserve-1")
    await reserve(credits, "u", 7 * MIB, "reserve-2")

    replay, trailers = await credits.call_with_trailers(
        "ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=5 * MIB, request_id="reserve-1"), "image"
    )
    released = await release(credits, "u", 2 * MIB, "release-1")
    released_again = await release(credits, "u", 2 * MIB, "release-1")
    reused = await credits.refused(
        "ReleaseStorage", pb.ReleaseStorageRequest(user_id="u", bytes=3 * MIB, request_id="release-1"), "image"
    )

    assert replay == pb.ReserveStorageResponse(account=first)
    assert trailers.get("idempotent-replayed") == "true"
    assert released_again == released
    assert released.storage_used_bytes == 10 * MIB
    assert (reused.code, reused.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    assert (await credits.account("u")).storage_used_bytes == 10 * MIB


async def test_release_never_goes_below_zero(credits, db):
    await reserve(credits, "u", 3 * MIB, "reserve-1")

    emptied = await release(credits, "u", 5 * MIB, "release-1")
    again = await release(credits, "u", 1, "release-2")

    assert (emptied.storage_used_bytes, again.storage_used_bytes) == (0, 0)
    released = await db.fetch("SELECT bytes FROM credits.storage_entries WHERE kind = 'RELEASE' ORDER BY seq")
    assert [row["bytes"] for row in released] == [-3 * MIB, 0]


async def test_a_full_quota_refusal_is_remembered(credits, db):
    await reserve(credits, "u", ONE_GIB, "fill")
    first = await credits.refused("ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=MIB,
                                                                             request_id="more"), "image")
    await release(credits, "u", ONE_GIB, "empty")

    replay = await credits.refused("ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=MIB,
                                                                              request_id="more"), "image")

    assert first.reason == replay.reason == "QUOTA_EXCEEDED"
    assert replay.metadata["replayed"] == "true"
    assert (await reserve(credits, "u", MIB, "more-again")).storage_used_bytes == MIB


async def test_a_smaller_plan_with_more_in_use_refuses_reservations_until_usage_drops(credits, db):
    pro = await set_plan(credits, "u", pb.PLAN_PRO)
    await reserve(credits, "u", 2 * ONE_GIB, "big")

    free = await set_plan(credits, "u", pb.PLAN_FREE)
    refused = await credits.refused("ReserveStorage", pb.ReserveStorageRequest(user_id="u", bytes=1,
                                                                               request_id="one-byte"), "image")
    await release(credits, "u", ONE_GIB + ONE_GIB // 2, "shrink")
    allowed = await reserve(credits, "u", MIB, "small")

    assert (pro.plan, pro.storage_quota_bytes) == (pb.PLAN_PRO, 100 * ONE_GIB)
    assert (free.plan, free.storage_used_bytes, free.storage_quota_bytes) == (pb.PLAN_FREE, 2 * ONE_GIB, ONE_GIB)
    assert dict(refused.metadata) == {"used": str(2 * ONE_GIB), "requested": "1", "quota": str(ONE_GIB)}
    assert allowed.storage_used_bytes == ONE_GIB // 2 + MIB


@pytest.mark.parametrize(
    ("plan", "quota"), [(pb.PLAN_FREE, ONE_GIB), (pb.PLAN_PRO, 100 * ONE_GIB), (pb.PLAN_ENTERPRISE, 500 * ONE_GIB)]
)
async def test_each_plan_has_its_quota(credits, plan, quota):
    account = await set_plan(credits, "u", plan)

    assert (account.plan, account.storage_quota_bytes) == (plan, quota)
    assert (await credits.account("u")).plan == plan


async def test_setting_the_same_plan_changes_nothing(credits, db):
    before = await credits.account("u")

    after = await set_plan(credits, "u", pb.PLAN_FREE)

    assert after == before


@pytest.mark.parametrize("plan", [pb.PLAN_UNSPECIFIED, 4, 99, -1, 2**31 - 1])
async def test_unknown_plan_is_invalid_argument_and_writes_nothing(credits, db, plan):
    details = await credits.refused("SetPlan", pb.SetPlanRequest(user_id="u", plan=plan))

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("plan",))
    assert sum((await count_rows(db)).values()) == 0


@pytest.mark.parametrize("method", ["ReserveStorage", "ReleaseStorage"])
@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"bytes": 0}, ("bytes",)),
        ({"bytes": -1}, ("bytes",)),
        ({"bytes": 2**50 + 1}, ("bytes",)),
        ({"bytes": 2**63 - 1}, ("bytes",)),
        ({"user_id": "\t"}, ("user_id",)),
        ({"request_id": ""}, ("request_id",)),
    ],
)
async def test_bad_storage_request_is_invalid_argument_and_writes_nothing(credits, db, method, request_fields, fields):
    request = {"user_id": "u", "bytes": 10, "request_id": "r-1", **request_fields}
    message = pb.ReserveStorageRequest(**request) if method == "ReserveStorage" else pb.ReleaseStorageRequest(**request)

    details = await credits.refused(method, message, "image")

    assert (details.code, details.fields) == (grpc.StatusCode.INVALID_ARGUMENT, fields)
    assert sum((await count_rows(db)).values()) == 0

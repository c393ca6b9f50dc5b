"""Who may call what: every method against every caller, and nothing written for a refusal."""

from __future__ import annotations

import grpc
import pytest

from casefile.credits.v1 import credits_service_pb2 as pb

from .helpers import count_rows

CALLERS = ("admin", "gateway", "story", "image")
# method -> (a valid request, the callers it admits)
METHODS = {
    "GetAccount": (pb.GetAccountRequest(user_id="u"), {"gateway", "admin", "image"}),
    "Grant": (pb.GrantRequest(user_id="u", amount=1, reason="r", request_id="r"), {"admin"}),
    "SetPlan": (pb.SetPlanRequest(user_id="u", plan=pb.PLAN_PRO), {"admin"}),
    "Charge": (pb.ChargeRequest(user_id="u", amount=1, reference="r", request_id="r"), {"image", "admin"}),
    "Refund": (pb.RefundRequest(charge_id="00000000-0000-0000-0000-000000000001", amount=1, reason="r",
                                request_id="r"), {"image", "admin"}),
    "ReserveStorage": (pb.ReserveStorageRequest(user_id="u", bytes=1, request_id="r"), {"image", "admin"}),
    "ReleaseStorage": (pb.ReleaseStorageRequest(user_id="u", bytes=1, request_id="r"), {"image", "admin"}),
    "RecordGeneration": (pb.RecordGenerationRequest(user_id="u", job_id="j", model="m", images_requested=1),
                         {"image", "admin"}),
    "GetUsage": (pb.GetUsageRequest(user_id="u"), {"gateway", "admin"}),
    "ListLedgerEntries": (pb.ListLedgerEntriesRequest(user_id="u"), {"gateway", "admin"}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
async def test_each_method_admits_exactly_its_callers(credits, db, method):
    request, admitted = METHODS[method]
    codes = {}
    for caller in CALLERS:
        rows_before = await count_rows(db)
        try:
            await credits.call(method, request, caller)
            codes[caller] = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            codes[caller] = error.code()
        if caller not in admitted:
            assert await count_rows(db) == rows_before, f"a refused {caller} wrote something"

    # Refund names no real charge: NOT_FOUND is its answer to an admitted caller.
    answer_when_admitted = grpc.StatusCode.NOT_FOUND if method == "Refund" else grpc.StatusCode.OK
    assert codes == {
        caller: answer_when_admitted if caller in admitted else grpc.StatusCode.PERMISSION_DENIED for caller in CALLERS
    }

"""gRPC edge of the credits service: request -> one domain call -> response."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from functools import wraps
from typing import Any, TypeVar

import asyncpg
import grpc

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from services.credits import domain
from shared.auth import allow
from shared.grpc_errors import ErrorTable, abort
from shared.proto_time import to_timestamp
from shared.grpc_server import add_strictly_decoded

log = logging.getLogger(__name__)

SERVICE_NAME = "casefile.credits.v1.CreditsService"

_CODE = grpc.StatusCode
# The one place a domain outcome becomes a status code and a stable ErrorInfo reason (the
# proto lists them); a subclass inherits its parent's row.
ERRORS = ErrorTable(
    "credits.casefile",
    {
        domain.RequestIdReused: (_CODE.INVALID_ARGUMENT, "REQUEST_ID_REUSED"),
        domain.JobRecordedWithOtherArguments: (_CODE.INVALID_ARGUMENT, "JOB_ID_REUSED"),
        domain.InvalidRequest: (_CODE.INVALID_ARGUMENT, None),
        domain.InsufficientCredits: (_CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"),
        domain.RefundExceedsCharge: (_CODE.FAILED_PRECONDITION, "REFUND_EXCEEDS_CHARGE"),
        domain.BalanceLimitExceeded: (_CODE.FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED"),
        domain.ChargeNotFound: (_CODE.NOT_FOUND, "CHARGE_NOT_FOUND"),
        domain.QuotaExceeded: (_CODE.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"),
        domain.RateLimited: (_CODE.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        domain.RequestContended: (_CODE.ABORTED, "REQUEST_CONTENDED"),
        domain.CreditsUnavailable: (_CODE.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    },
)

# Who may call what: CONTRACT.md, plus admin on the image service's methods so operators
# can correct an account by hand.
ALLOWED_CALLERS = allow(
    SERVICE_NAME,
    {
        "GetAccount": ["gateway", "admin", "image"],
        "Grant": ["admin"],
        "SetPlan": ["admin"],
        "Charge": ["image", "admin"],
        "Refund": ["image", "admin"],
        "ReserveStorage": ["image", "admin"],
        "ReleaseStorage": ["image", "admin"],
        "RecordGeneration": ["image", "admin"],
        "GetUsage": ["gateway", "admin"],
        "ListLedgerEntries": ["gateway", "admin"],
    },
)

# Stripe's Idempotent-Replayed header, as gRPC trailing metadata.
REPLAYED_METADATA = (("idempotent-replayed", "true"),)

_PLANS_TO_PROTO = {
    domain.Plan.FREE: pb.PLAN_FREE,
    domain.Plan.PRO: pb.PLAN_PRO,
    domain.Plan.ENTERPRISE: pb.PLAN_ENTERPRISE,
}
_PLANS_FROM_PROTO = {number: plan for plan, number in _PLANS_TO_PROTO.items()}
_KINDS_TO_PROTO = {
    domain.LedgerEntryKind.GRANT: pb.LEDGER_ENTRY_KIND_GRANT,
    domain.LedgerEntryKind.CHARGE: pb.LEDGER_ENTRY_KIND_CHARGE,
    domain.LedgerEntryKind.REFUND: pb.LEDGER_ENTRY_KIND_REFUND,
    domain.LedgerEntryKind.ADJUSTMENT: pb.LEDGER_ENTRY_KIND_ADJUSTMENT,
}

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


def _refusing_errors(method: Handler) -> Handler:
    """Every exception leaves as a status from ERRORS: never UNKNOWN, INTERNAL only for bugs."""

    @wraps(method)
    async def handle(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except domain.RememberedRefusal as error:
            # A replayed refusal carries the trailer a replayed answer does.
            refusal = ERRORS.refusal_for(error)
            if error.metadata.get("replayed") == "true":
                refusal = dataclasses.replace(refusal, trailers=REPLAYED_METADATA)
            await abort(context, refusal)
        except domain.CreditsError as error:
            await ERRORS.abort(context, error)
        except Exception as error:
            log.exception("credits.rpc_failed", extra={"method": method.__name__})
            await ERRORS.abort(context, error)

    return handle  # type: ignore[return-value]


def _unwrap(context: grpc.aio.ServicerContext, answered: domain.Answered[T]) -> T:
    if answered.replayed:
        context.set_trailing_metadata(REPLAYED_METADATA)
    return answered.value


class CreditsServicer(pb_grpc.CreditsServiceServicer):
    def __init__(self, pool: asyncpg.Pool, charge_limit: domain.ChargeRateLimit) -> None:
        self._pool = pool
        self._accounts = domain.Accounts(pool)
        self._charges = domain.Charges(pool, charge_limit)

    @_refusing_errors
    async def GetAccount(self, request: pb.GetAccountRequest, context: grpc.aio.ServicerContext) -> pb.GetAccountResponse:
        account = await self._accounts.get(request.user_id)
        return pb.GetAccountResponse(account=account_to_proto(account))

    @_refusing_errors
    async def Grant(self, request: pb.GrantRequest, context: grpc.aio.ServicerContext) -> pb.GrantResponse:
        answered = await domain.grant(
            self._pool, user_id=request.user_id, amount=request.amount, reason=request.reason,
            request_id=request.request_id,
        )
        return pb.GrantResponse(account=account_to_proto(_unwrap(context, answered)))

    @_refusing_errors
    async def SetPlan(self, request: pb.SetPlanRequest, context: grpc.aio.ServicerContext) -> pb.SetPlanResponse:
        account = await domain.set_plan(self._pool, user_id=request.user_id, plan=_PLANS_FROM_PROTO.get(request.plan))
        return pb.SetPlanResponse(account=account_to_proto(account))

    @_refusing_errors
    async def Charge(self, request: pb.ChargeRequest, context: grpc.aio.ServicerContext) -> pb.ChargeResponse:
        answered = await domain.charge(
            self._charges, user_id=request.user_id, amount=request.amount,
            reference=request.reference, request_id=request.request_id,
        )
        charged = _unwrap(context, answered)
        return pb.ChargeResponse(charge_id=charged.charge_id, balance=charged.balance)

    @_refusing_errors
    async def Refund(self, request: pb.RefundRequest, context: grpc.aio.ServicerContext) -> pb.RefundResponse:
        answered = await domain.refund(
            self._pool, charge_id=request.charge_id, amount=request.amount, reason=request.reason,
            request_id=request.request_id,
        )
        refunded = _unwrap(context, answered)
        return pb.RefundResponse(balance=refunded.balance, refund_id=refunded.refund_id)

    @_refusing_errors
    async def ReserveStorage(
        self, request: pb.ReserveStorageRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveStorageResponse:
        answered = await domain.reserve_storage(
            self._pool, user_id=request.user_id, size=request.bytes, request_id=request.request_id
        )
        return pb.ReserveStorageResponse(account=account_to_proto(_unwrap(context, answered)))

    @_refusing_errors
    async def ReleaseStorage(
        self, request: pb.ReleaseStorageRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseStorageResponse:
        answered = await domain.release_storage(
            self._pool, user_id=request.user_id, size=request.bytes, request_id=request.request_id
        )
        return pb.ReleaseStorageResponse(account=account_to_proto(_unwrap(context, answered)))

    @_refusing_errors
    async def RecordGeneration(
        self, request: pb.RecordGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordGenerationResponse:
        answered = await domain.record_generation(
            self._pool, user_id=request.user_id, job_id=request.job_id, model=request.model,
            images_requested=request.images_requested, images_delivered=request.images_delivered,
            bytes_stored=request.bytes_stored, request_id=request.request_id,
        )
        return pb.RecordGenerationResponse(usage=usage_to_proto(_unwrap(context, answered)))

    @_refusing_errors
    async def GetUsage(self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext) -> pb.GetUsageResponse:
        usage = await domain.get_usage(self._pool, request.user_id)
        return pb.GetUsageResponse(usage=usage_to_proto(usage))

    @_refusing_errors
    async def ListLedgerEntries(
        self, request: pb.ListLedgerEntriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLedgerEntriesResponse:
        page = await domain.list_ledger_entries(
            self._pool, user_id=request.user_id, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListLedgerEntriesResponse(
            entries=[entry_to_proto(entry) for entry in page.entries], next_page_token=page.next_page_token
        )


def charge_rate_limit(per_second: float, burst: int) -> domain.ChargeRateLimit:
    # repr() gives the shortest decimal that is this float, so 0.1 stays 0.1, exactly.
    return domain.ChargeRateLimit(per_second=Decimal(repr(per_second)), burst=burst)


def register(servicer: CreditsServicer) -> Callable[[grpc.aio.Server], None]:
    """The ServiceSpec.register callback for this servicer."""

    def add_to(server: grpc.aio.Server) -> None:
        add_strictly_decoded(server, pb.DESCRIPTOR.services_by_name["CreditsService"], servicer)

    return add_to


def account_to_proto(account: domain.Account) -> pb.Account:
    return pb.Account(
        user_id=account.user_id,
        plan=_PLANS_TO_PROTO[account.plan],
        balance=account.balance,
        storage_used_bytes=account.storage_used_bytes,
        storage_quota_bytes=account.storage_quota_bytes,
        create_time=to_timestamp(account.created_at),
        update_time=to_timestamp(account.updated_at),
    )


def usage_to_proto(usage: domain.Usage) -> pb.Usage:
    return pb.Usage(
        user_id=usage.user_id,
        generations_count=usage.generations_count,
        generations_success=usage.generations_success,
        generations_failed=usage.generations_failed,
        credits_used=usage.credits_used,
        model_usage=usage.model_usage,
        storage_used_bytes=usage.storage_used_bytes,
        bytes_generated=usage.bytes_generated,
    )


def entry_to_proto(entry: domain.LedgerEntry) -> pb.LedgerEntry:
    return pb.LedgerEntry(
        entry_id=entry.entry_id,
        user_id=entry.user_id,
        kind=_KINDS_TO_PROTO[entry.kind],
        amount=entry.amount,
        balance_after=entry.balance_after,
        reference=entry.reference,
        request_id=entry.request_id,
        create_time=to_timestamp(entry.created_at),
        refunded_charge_id=entry.refunded_charge_id,
    )



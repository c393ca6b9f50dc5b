"""gRPC edge of the credits service: request -> one domain call -> response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import NoReturn, TypeVar

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from services.credits import domain
from shared.auth import allow

SERVICE_NAME = "casefile.credits.v1.CreditsService"

# The one place a domain outcome becomes a status code; the message is str(error).
ERROR_CODES: dict[type[domain.DomainError], grpc.StatusCode] = {
    domain.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    domain.NotFound: grpc.StatusCode.NOT_FOUND,
    domain.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    domain.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    domain.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

# Who may call what, as in CONTRACT.md.
ALLOWED_CALLERS = allow(
    SERVICE_NAME,
    {
        "GetAccount": ["gateway", "admin", "image"],
        "Grant": ["admin"],
        "SetPlan": ["admin"],
        "Charge": ["image"],
        "Refund": ["image", "admin"],
        "ReserveStorage": ["image"],
        "ReleaseStorage": ["image"],
        "RecordGeneration": ["image"],
        "GetUsage": ["gateway", "admin"],
        "ListLedgerEntries": ["gateway", "admin"],
    },
)

_PLANS = {
    domain.Plan.FREE: pb.PLAN_FREE,
    domain.Plan.PRO: pb.PLAN_PRO,
    domain.Plan.ENTERPRISE: pb.PLAN_ENTERPRISE,
}

T = TypeVar("T")


class CreditsServicer(pb_grpc.CreditsServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def GetAccount(
        self, request: pb.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAccountResponse:
        account = await _run(context, domain.get_account(self._pool, request.user_id))
        return pb.GetAccountResponse(account=account_to_proto(account))

    async def Grant(
        self, request: pb.GrantRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "Grant")

    async def SetPlan(
        self, request: pb.SetPlanRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "SetPlan")

    async def Charge(
        self, request: pb.ChargeRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "Charge")

    async def Refund(
        self, request: pb.RefundRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "Refund")

    async def ReserveStorage(
        self, request: pb.ReserveStorageRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "ReserveStorage")

    async def ReleaseStorage(
        self, request: pb.ReleaseStorageRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "ReleaseStorage")

    async def RecordGeneration(
        self, request: pb.RecordGenerationRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "RecordGeneration")

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "GetUsage")

    async def ListLedgerEntries(
        self, request: pb.ListLedgerEntriesRequest, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        await _not_implemented(context, "ListLedgerEntries")


def register(servicer: CreditsServicer) -> Callable[[grpc.aio.Server], None]:
    """The ServiceSpec.register callback for this servicer."""

    def add_to(server: grpc.aio.Server) -> None:
        pb_grpc.add_CreditsServiceServicer_to_server(servicer, server)

    return add_to


def account_to_proto(account: domain.Account) -> pb.Account:
    return pb.Account(
        user_id=account.user_id,
        plan=_PLANS[account.plan],
        balance=account.balance,
        storage_used_bytes=account.storage_used_bytes,
        storage_quota_bytes=account.storage_quota_bytes,
        create_time=_timestamp(account.created_at),
        update_time=_timestamp(account.updated_at),
    )


async def _run(context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
    """Awaits the domain call; a DomainError aborts the RPC with its mapped code."""
    try:
        return await call
    except domain.DomainError as error:
        await context.abort(_code_for(error), str(error))
        raise  # unreachable: abort raises; keeps type checkers honest


def _code_for(error: domain.DomainError) -> grpc.StatusCode:
    for error_class in type(error).__mro__:
        if error_class in ERROR_CODES:
            return ERROR_CODES[error_class]
    # A DomainError without a mapping is our bug, not the caller's.
    return grpc.StatusCode.INTERNAL


async def _not_implemented(context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp

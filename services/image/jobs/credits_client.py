"""The credits service as generation jobs see it: six calls, outcomes in domain terms.

Refusals are told apart by their google.rpc ErrorInfo reason (shared.grpc_errors.details_of),
never by message text. Anything that is not an answer (UNAVAILABLE, DEADLINE_EXCEEDED,
ABORTED, a wrong token an operator can fix) is CreditsUnavailable: safe to retry with the
same request_id, since every call here is idempotent by it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from casefile.credits.v1 import credits_service_pb2 as pb
from casefile.credits.v1 import credits_service_pb2_grpc as pb_grpc
from services.image.jobs.domain import (
    Account,
    ChargeNotFound,
    ChargeRateLimited,
    Charged,
    CreditsRefusedRequest,
    CreditsUnavailable,
    InsufficientCredits,
    RefundExceedsCharge,
    StorageQuotaExceeded,
)
from shared.auth import bearer_metadata
from shared.grpc_errors import ErrorDetails, details_of


class CreditsClient:
    def __init__(self, stub: pb_grpc.CreditsServiceStub, token: str, *, timeout: float = 10.0) -> None:
        self._stub = stub
        self._metadata = bearer_metadata(token)
        self.timeout = timeout

    def __repr__(self) -> str:
        return "CreditsClient()"

    async def get_account(self, user_id: str) -> Account:
        account = (await self._call(self._stub.GetAccount, pb.GetAccountRequest(user_id=user_id))).account
        return Account(account.balance, account.storage_used_bytes, account.storage_quota_bytes)

    async def charge(self, *, user_id: str, amount: int, reference: str, request_id: str) -> Charged:
        request = pb.ChargeRequest(user_id=user_id, amount=amount, reference=reference, request_id=request_id)
        reply = await self._call(self._stub.Charge, request)
        return Charged(reply.charge_id, reply.balance)

    async def refund(self, *, charge_id: str, amount: int, reason: str, request_id: str) -> int:
        request = pb.RefundRequest(charge_id=charge_id, amount=amount, reason=reason, request_id=request_id)
        return (await self._call(self._stub.Refund, request)).balance

    async def reserve_storage(self, *, user_id: str, size: int, request_id: str) -> None:
        await self._call(self._stub.ReserveStorage, pb.ReserveStorageRequest(user_id=user_id, bytes=size, request_id=request_id))

    async def release_storage(self, *, user_id: str, size: int, request_id: str) -> None:
        await self._call(self._stub.ReleaseStorage, pb.ReleaseStorageRequest(user_id=user_id, bytes=size, request_id=request_id))

    async def record_generation(
        self, *, user_id: str, job_id: str, model: str, requested: int, delivered: int, bytes_stored: int
    ) -> None:
        request = pb.RecordGenerationRequest(
            user_id=user_id, job_id=job_id, model=model, images_requested=requested, images_delivered=delivered,
            bytes_stored=bytes_stored, request_id=f"job:{job_id}:usage",
        )  # fmt: skip
        await self._call(self._stub.RecordGeneration, request)

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Message) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise _refusal(details_of(error)) from error


def _refusal(details: ErrorDetails) -> Exception:
    metadata = details.metadata
    message = f"credits {details.code.name}: {details.message}"
    if details.reason == "INSUFFICIENT_CREDITS":
        return InsufficientCredits(balance=_int(metadata, "balance"), cost=_int(metadata, "cost"))
    if details.reason == "QUOTA_EXCEEDED":
        return StorageQuotaExceeded(used=_int(metadata, "used"), quota=_int(metadata, "quota"))
    if details.reason == "RATE_LIMITED":
        return ChargeRateLimited(details.retry_after_seconds or 1.0)
    if details.reason == "REFUND_EXCEEDS_CHARGE":
        return RefundExceedsCharge(message)
    if details.reason == "CHARGE_NOT_FOUND":
        return ChargeNotFound(message)
    if details.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
        # Our own request is malformed, or our token is not admitted: a bug or a setup
        # error that no retry fixes; the caller logs it and treats it as unavailable.
        return CreditsRefusedRequest(message)
    return CreditsUnavailable(message, retry_after_seconds=details.retry_after_seconds)


def _int(metadata: Any, key: str) -> int:
    try:
        return int(metadata.get(key, 0))
    except (TypeError, ValueError):
        return 0

"""gRPC errors a program can act on: google.rpc details on the server, read back on the client.

Servers abort through an `ErrorTable`: one table per service maps each domain error class
to a status code and a stable ErrorInfo `reason`. What goes into the details comes from
the error itself, by these optional attributes (domain code stays free of gRPC):

- `field` and `problem`, or `violations` (a sequence of (field, problem)): BadRequest
- `metadata` (a mapping of str to str): ErrorInfo.metadata, e.g. the balance and the cost
- `retry_after_seconds` (a float): RetryInfo.retry_delay

INVALID_ARGUMENT carries BadRequest; NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED (and
any code given a reason) carry ErrorInfo; RetryInfo goes wherever a delay is known.
Clients call `details_of(rpc_error)` instead of reading message text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

# The trailing metadata key the gRPC rich error model uses (grpc_status reads it too).
_DETAILS_KEY = "grpc-status-details-bin"
# A message far beyond this is a bug (a whole request echoed back); the status travels in
# HTTP/2 trailers, which peers cap at a few KiB.
_MAX_MESSAGE_CHARS = 2000
_CODES_WITH_ERROR_INFO = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


@dataclass(frozen=True)
class Refusal:
    """Everything one rich error says; build with the keywords, send with `abort`."""

    code: grpc.StatusCode
    message: str
    violations: Sequence[tuple[str, str]] = ()
    reason: str | None = None
    domain: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after_seconds: float | None = None
    # Plain trailing metadata sent beside the details (e.g. idempotent-replayed: true).
    trailers: Sequence[tuple[str, str]] = ()

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=_code_number(self.code), message=_short(self.message))
        for detail in self._details():
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return rpc_status.to_status(status)

    def _details(self) -> list[Any]:
        details: list[Any] = []
        if self.violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=name, description=problem)
                        for name, problem in self.violations
                    ]
                )
            )
        if self.reason is not None:
            details.append(
                error_details_pb2.ErrorInfo(
                    reason=self.reason,
                    domain=self.domain or "",
                    metadata={str(key): str(value) for key, value in self.metadata.items()},
                )
            )
        if self.retry_after_seconds is not None:
            details.append(error_details_pb2.RetryInfo(retry_delay=_duration(self.retry_after_seconds)))
        return details


async def abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> NoReturn:
    """Ends the RPC with `refusal`, its details in the trailers."""
    status = refusal.to_status()
    await context.abort(status.code, status.details, (*status.trailing_metadata, *refusal.trailers))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def invalid_argument(field_name: str, problem: str) -> Refusal:
    """INVALID_ARGUMENT naming one field, for a refusal made at the edge (a bad enum, say)."""
    return Refusal(
        grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {problem}", violations=((field_name, problem),)
    )


class ErrorTable:
    """One service's map from domain error classes to (status code, ErrorInfo reason).

    Lookup walks each error's class hierarchy, so a subclass inherits its parent's entry;
    an error with no entry is the server's bug and becomes INTERNAL, never UNKNOWN.
    """

    def __init__(
        self, domain: str, entries: Mapping[type[BaseException], tuple[grpc.StatusCode, str | None]]
    ) -> None:
        self.domain = domain
        self._entries = dict(entries)

    def entry_for(self, error: BaseException) -> tuple[grpc.StatusCode, str | None] | None:
        for error_class in type(error).__mro__:
            if error_class in self._entries:
                return self._entries[error_class]
        return None

    def refusal_for(self, error: BaseException) -> Refusal:
        entry = self.entry_for(error)
        if entry is None:
            log.error("rpc.error_unmapped", extra={"error": repr(error), "error_class": type(error).__name__})
            return Refusal(grpc.StatusCode.INTERNAL, "internal error; nothing was changed")
        code, reason = entry
        if reason is None and code in _CODES_WITH_ERROR_INFO:
            reason = _reason_from_class_name(type(error).__name__)
        return Refusal(
            code,
            str(error),
            violations=_violations_of(error),
            reason=reason,
            domain=self.domain if reason is not None else None,
            metadata=getattr(error, "metadata", None) or {},
            retry_after_seconds=getattr(error, "retry_after_seconds", None),
        )

    async def abort(self, context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
        await abort(context, self.refusal_for(error))


# ---------------------------------------------------------------- the client side


@dataclass(frozen=True)
class ErrorDetails:
    """What a client can act on in a failed call's trailers; empty fields when absent."""

    code: grpc.StatusCode
    message: str
    violations: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_after_seconds: float | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.violations)


def details_of(error: grpc.RpcError) -> ErrorDetails:
    """The google.rpc details of a failed call (grpc.aio or sync); never raises."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    status = _status_from_trailers(error)
    if status is None:
        return ErrorDetails(code=code, message=message or "")
    violations: list[tuple[str, str]] = []
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            packed.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
        elif packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            packed.Unpack(retry)
            retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return ErrorDetails(code, message or "", tuple(violations), reason, domain, metadata, retry_after)


def _status_from_trailers(error: grpc.RpcError) -> status_pb2.Status | None:
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - a peer's garbage is "no details", not a crash
                return None
    return None


# ---------------------------------------------------------------- helpers


def _violations_of(error: BaseException) -> tuple[tuple[str, str], ...]:
    violations = getattr(error, "violations", None)
    if violations:
        return tuple((str(name), str(problem)) for name, problem in violations)
    name = getattr(error, "field", None)
    if name:
        return ((str(name), str(getattr(error, "problem", None) or error)),)
    return ()


def _reason_from_class_name(name: str) -> str:
    """StoryNotFound -> STORY_NOT_FOUND: a stable default when a table gives no reason."""
    out: list[str] = []
    for index, char in enumerate(name):
        if char.isupper() and index and not name[index - 1].isupper():
            out.append("_")
        out.append(char.upper())
    return "".join(out)


def _code_number(code: grpc.StatusCode) -> int:
    # grpc.StatusCode and google.rpc.Code share their numbers.
    return code.value[0]


def _duration(seconds: float) -> duration_pb2.Duration:
    total_nanos = max(0, round(seconds * 1e9))
    return duration_pb2.Duration(seconds=total_nanos // 1_000_000_000, nanos=total_nanos % 1_000_000_000)


def _short(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 1] + "…"

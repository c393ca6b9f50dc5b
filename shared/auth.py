"""Bearer-token authentication and a per-method table of which callers may call what.

A token names a caller ("gateway", "admin", "story", "image"). Health checks and server
reflection stay open so operators and orchestrators can probe without a token.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from shared.config import TOKEN_HASH_PREFIX

log = logging.getLogger(__name__)

_OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_BEARER = "bearer "

_current_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "casefile_current_caller", default=None
)


def current_caller() -> str | None:
    """The authenticated caller of the RPC being handled, for handlers' logs."""
    return _current_caller.get()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a client: `stub.GetStory(req, metadata=bearer_metadata(token))`."""
    return (("authorization", f"Bearer {token}"),)


def allow(service_full_name: str, table: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """{"GetStory": ["gateway"]} -> {"/casefile.story.v1.StoryService/GetStory": {"gateway"}}."""
    return {
        f"/{service_full_name}/{method}": frozenset(callers) for method, callers in table.items()
    }


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a known token, or from a caller the method does not allow."""

    def __init__(self, tokens: Mapping[str, str], allowed: Mapping[str, frozenset[str]]) -> None:
        # Encoded once so every request compares bytes in constant time. Entries listed as
        # "sha256:<hex>" are compared with the hash of the presented token.
        self._tokens = [_known_token(token, caller) for token, caller in tokens.items()]
        self._allowed = dict(allowed)
        # Presented tokens that matched, and their caller: every call carries one of a few
        # tokens, and hashing plus comparing against each known one was most of the
        # check's time. Only matches are kept (so at most one entry per known token, and a
        # guess never grows it); the tokens are fixed for the process's life and never
        # expire, so a match stays true. A miss takes the constant-time path below.
        self._verified: dict[str, str] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(_OPEN_PREFIXES):
            return handler
        caller, refusal = self._check(method, handler_call_details.invocation_metadata, exists=handler is not None)
        if refusal is not None:
            code, message = refusal
            log.warning(
                "auth.refused", extra={"method": method, "caller": caller, "reason": message}
            )
            return _aborting_handler(handler, code, message)
        # The interceptor runs in the RPC's own task, so the handler sees this value.
        _current_caller.set(caller)
        return handler

    def _check(
        self, method: str, metadata: Iterable[Any] | None, *, exists: bool
    ) -> tuple[str | None, tuple[grpc.StatusCode, str] | None]:
        """(caller, None) when allowed, else (caller or None, (code, message)). A method the
        server does not have is UNIMPLEMENTED for a known caller (a typo in grpcurl is not
        a missing right); a method it has but the table omits stays refused."""
        token = _bearer_token(metadata)
        if token is None:
            return None, (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        caller = self._caller_for(token)
        if caller is None:
            return None, (grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if not exists and method not in self._allowed:
            return caller, (grpc.StatusCode.UNIMPLEMENTED, f"no method {method} on this server")
        if caller not in self._allowed.get(method, frozenset()):
            short_name = method.rsplit("/", 1)[-1]
            message = f"caller '{caller}' may not call {short_name}"
            return caller, (grpc.StatusCode.PERMISSION_DENIED, message)
        return caller, None

    def _caller_for(self, token: str) -> str | None:
        caller = self._verified.get(token)
        if caller is None:
            caller = self._compare_with_known(token)
            if caller is not None:
                self._verified[token] = caller
        return caller

    def _compare_with_known(self, token: str) -> str | None:
        presented = token.encode()
        presented_hash = hashlib.sha256(presented).hexdigest().encode()
        caller = None
        # No early exit: the time taken must not reveal which token matched.
        for known, hashed, name in self._tokens:
            if hmac.compare_digest(presented_hash if hashed else presented, known):
                caller = name
        return caller


def _known_token(token: str, caller: str) -> tuple[bytes, bool, str]:
    if token.startswith(TOKEN_HASH_PREFIX):
        return token[len(TOKEN_HASH_PREFIX) :].encode(), True, caller
    return token.encode(), False, caller


def token_hash(token: str) -> str:
    """The AUTH_TOKENS spelling of a caller listed by hash: `name:` + token_hash(token)."""
    return TOKEN_HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _bearer_token(metadata: Iterable[Any] | None) -> str | None:
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if isinstance(value, bytes):
            return None
        if value[: len(_BEARER)].lower() == _BEARER and value[len(_BEARER) :].strip():
            return value[len(_BEARER) :].strip()
        return None
    return None


def _aborting_handler(
    real: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only aborts with `code`."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    request_streaming = real is not None and real.request_streaming
    response_streaming = real is not None and real.response_streaming
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)

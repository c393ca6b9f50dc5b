"""Images and their URLs: turning a storage id into a URL a client can open for a while."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from shared.validation import id_problem, optional_id_problem

PORTRAIT_PREFIX = "portraits/"
MAX_STORAGE_ID_CHARS = 1024
DEFAULT_URL_SECONDS = 3600
MAX_URL_SECONDS = 604_800


class UrlError(Exception):
    """GetImageUrl refused; handlers map each subclass to a status."""


class InvalidField(UrlError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ImageNotFound(UrlError):
    def __init__(self, message: str) -> None:
        super().__init__(f"storage_id: {message}")


class SignedObjects(Protocol):
    async def exists(self, key: str) -> bool: ...
    async def presigned_get_url(self, key: str, expires_in: int) -> str: ...


@dataclass(frozen=True)
class SignedUrl:
    url: str
    expire_time: datetime


async def image_url(
    objects: SignedObjects,
    *,
    storage_id: str,
    user_id: str,
    expires_in_seconds: int,
    owns: Callable[[str, str], Awaitable[bool]] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SignedUrl:
    """A URL a client can open until expire_time: for a story portrait (user_id empty)
    when the object exists; for a player's image when `owns(user_id, storage_id)` says it
    is one of theirs, delivered and not deleted. ImageNotFound otherwise."""
    problem = id_problem(storage_id, max_chars=MAX_STORAGE_ID_CHARS) or _key_problem(storage_id)
    if problem is not None:
        raise InvalidField("storage_id", problem)
    problem = optional_id_problem(user_id)
    if problem is not None:
        raise InvalidField("user_id", problem)
    lifetime = _url_lifetime(expires_in_seconds)
    if user_id:
        if owns is None or not await owns(user_id, storage_id):
            raise ImageNotFound("no such image for this user")
    elif not storage_id.startswith(PORTRAIT_PREFIX) or not await objects.exists(storage_id):
        raise ImageNotFound("no such portrait")
    expire_time = now() + timedelta(seconds=lifetime)
    return SignedUrl(await objects.presigned_get_url(storage_id, lifetime), expire_time)


def _key_problem(storage_id: str) -> str | None:
    """Keys this service makes are '/'-separated names: an empty, '.' or '..' segment is
    none of them, and S3 answers such a key with 400, which is the caller's mistake and not
    an outage to retry."""
    if any(segment in ("", ".", "..") for segment in storage_id.split("/")):
        return "must be a key of '/'-separated names, none empty, '.' or '..'"
    return None


def _url_lifetime(expires_in_seconds: int) -> int:
    if expires_in_seconds == 0:
        return DEFAULT_URL_SECONDS
    if not 1 <= expires_in_seconds <= MAX_URL_SECONDS:
        raise InvalidField("expires_in_seconds", f"must be 0 (one hour) or 1 to {MAX_URL_SECONDS}")
    return expires_in_seconds

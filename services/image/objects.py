"""S3 object storage for images, over aiobotocore.

Every call is bounded by `timeout_seconds` (retries included), so a slow S3 shows up as
DependencyUnavailable within a known time, which the pipelines' leases are sized for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig

from services.image.errors import DependencyUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_ALREADY_MINE_CODES = frozenset({"BucketAlreadyOwnedByYou"})
_FORBIDDEN_CODES = frozenset({"403", "AccessDenied", "Forbidden"})
# Everything a network or S3 failure can raise through aiobotocore.
_S3_FAILURES = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    aiohttp.ClientError,
    OSError,
    asyncio.TimeoutError,
)


_PRECONDITION_FAILED_CODES = frozenset({"PreconditionFailed", "412"})
DEFAULT_TIMEOUT_SECONDS = 20.0
# botocore's default of 10 queues a thousand jobs' uploads ten at a time.
DEFAULT_POOL_CONNECTIONS = 64


def s3_client_config(
    *, custom_endpoint: bool, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_pool_connections: int = DEFAULT_POOL_CONNECTIONS, plain_http: bool = False,
) -> AioConfig:  # fmt: skip
    """Short timeouts and few retries: the pipelines retry through redelivery."""
    # botocore's defaults (60 s connect timeout, legacy retries) would hold a message for
    # minutes while S3 is down, longer than the consumer's ack wait.
    return AioConfig(
        signature_version="s3v4",
        connect_timeout=min(5, timeout_seconds),
        read_timeout=timeout_seconds,
        retries={"max_attempts": 2, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        # MinIO, moto and rclone on host:port need bucket-in-path URLs; AWS prefers its default.
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
        # Over plain http SigV4 signs the body's SHA-256: with no TLS, the signature is all
        # that ties the bytes to the request, so it stays on although it is about a third of
        # a 1 MB put's client CPU (payload_signing_enabled=False would turn it off, checked
        # on botocore 1.43). botocore's default CRC32 of every body (when_supported) would
        # be a second hash of the same bytes, one S3 does not ask for here. Over TLS the
        # CRC32 is what lets botocore leave the payload unsigned, the cheaper of the two:
        # kept there.
        request_checksum_calculation="when_required" if plain_http else "when_supported",
    )


class ObjectStore:
    """One bucket. `presign_client` signs URLs for the endpoint clients reach, if different."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        region: str,
        presign_client: Any = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        server_side_encryption: str | None = None,
    ) -> None:
        self._client = client
        self.timeout_seconds = timeout_seconds
        self._presign_client = presign_client or client
        self.bucket = bucket
        self._region = region
        self._bucket_ready = False
        self._bucket_lock = asyncio.Lock()
        # Asked of S3 for the objects put with `encrypted=True` (players' images): "AES256".
        self._server_side_encryption = server_side_encryption

    async def ensure_bucket(self) -> None:
        """Creates the bucket when missing; raises Unavailable when S3 cannot be reached."""
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                async with asyncio.timeout(self.timeout_seconds):
                    await self._create_bucket_if_missing()
            except _S3_FAILURES as error:
                log.warning(
                    "s3.bucket_check_failed",
                    extra={"bucket": self.bucket, "error": _describe(error)},
                )
                raise DependencyUnavailable(f"object storage: {_describe(error)}") from error
            self._bucket_ready = True

    async def try_ensure_bucket(self) -> bool:
        """At start-up: an S3 outage must not stop the service; put() checks again later."""
        try:
            await self.ensure_bucket()
        except DependencyUnavailable:
            return False
        return True

    async def put_new(
        self, key: str, data: bytes, content_type: str, *, encrypted: bool = False, known_absent: bool = False
    ) -> bool:
        """Stores the object unless the key exists; False when it was there already.

        Keys are never overwritten: the check comes first, and the PUT itself carries
        If-None-Match: * for servers that honour it (AWS, MinIO, moto). `known_absent`
        skips the check when the caller knows nobody wrote the key yet (a key of its own,
        or one it just checked), saving a round trip; If-None-Match still guards the PUT.
        `encrypted` asks S3 for the store's server-side encryption.
        """
        await self.ensure_bucket()
        if not known_absent and await self.exists(key):
            return False
        extra = self._encryption(encrypted)
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*", **extra
                )
        except botocore.exceptions.ClientError as error:
            if _error_code(error) in _PRECONDITION_FAILED_CODES:
                return False
            raise DependencyUnavailable(f"object storage: {_describe(error)}") from error
        except _S3_FAILURES as error:
            raise DependencyUnavailable(f"object storage: {_describe(error)}") from error
        return True

    async def exists(self, key: str) -> bool:
        async def head() -> bool:
            await self._client.head_object(Bucket=self.bucket, Key=key)
            return True

        return await self._on_key(head, when_missing=False)

    async def put(self, key: str, data: bytes, content_type: str, *, encrypted: bool = False) -> None:
        """Stores the object under `key`, replacing what is there: for callers whose key
        always gets the same bytes, so a repeat changes nothing and needs no check first."""
        await self.ensure_bucket()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **self._encryption(encrypted)
                )
        except _S3_FAILURES as error:
            raise DependencyUnavailable(f"object storage: {_describe(error)}") from error

    async def get(self, key: str) -> bytes | None:
        """The object's bytes; None when there is no such key."""

        async def read() -> bytes | None:
            reply = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with reply["Body"] as body:
                return await body.read()

        return await self._on_key(read, when_missing=None)

    async def _on_key(self, call: Callable[[], Awaitable[T]], *, when_missing: T) -> T:
        """`call` within the timeout: `when_missing` when S3 says the key is not there, and
        DependencyUnavailable for whatever else S3 or the network raises."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await call()
        except botocore.exceptions.ClientError as error:
            if _error_code(error) in _MISSING_CODES:
                return when_missing
            raise DependencyUnavailable(f"object storage: {_describe(error)}") from error
        except _S3_FAILURES as error:
            raise DependencyUnavailable(f"object storage: {_describe(error)}") from error

    def _encryption(self, encrypted: bool) -> dict[str, str]:
        return {"ServerSideEncryption": self._server_side_encryption} if encrypted and self._server_side_encryption else {}

    async def delete(self, key: str) -> None:
        """Removes the object; a key that is not there is already what was asked."""

        async def delete() -> None:
            await self._client.delete_object(Bucket=self.bucket, Key=key)

        await self._on_key(delete, when_missing=None)

    async def presigned_get_url(self, key: str, expires_in: int) -> str:
        # Signing is local computation; no request reaches S3 here.
        return await self._presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
        )

    async def _create_bucket_if_missing(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as error:
            if _error_code(error) in _FORBIDDEN_CODES:
                # Credentials allowed to write objects but not to inspect the bucket are a
                # normal least-privilege setup: the first put will tell if it is missing.
                log.warning("s3.bucket_check_failed", extra={"bucket": self.bucket})
                return
            if _error_code(error) not in _MISSING_CODES:
                raise
        try:
            await self._client.create_bucket(**self._create_bucket_args())
        except botocore.exceptions.ClientError as error:
            # Another image process may have created it between our check and our create.
            if _error_code(error) not in _ALREADY_MINE_CODES:
                raise
        log.info("s3.bucket_created", extra={"bucket": self.bucket})

    def _create_bucket_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket}
        # us-east-1 is S3's default location and rejects an explicit constraint.
        if self._region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        return args


def _error_code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]

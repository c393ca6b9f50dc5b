"""Signed CloudFront URLs for images, where a CDN is configured (CLOUDFRONT_DOMAIN,
CLOUDFRONT_KEY_PAIR_ID, CLOUDFRONT_PRIVATE_KEY): botocore's CloudFrontSigner with a canned
policy (the URL opens until its expiry), signed RSA-SHA1 as CloudFront requires."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol
from urllib.parse import quote

from botocore.signers import CloudFrontSigner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class UnusableKey(ValueError):
    """The private key is not an RSA key in PEM (CloudFront signs with RSA only)."""


def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    # An environment variable often carries the PEM's newlines as the two characters "\n".
    text = pem.replace("\\n", "\n").strip().encode()
    try:
        key = serialization.load_pem_private_key(text, password=None)
    except (ValueError, TypeError) as error:
        raise UnusableKey(f"not a PEM private key without a passphrase ({type(error).__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UnusableKey("CloudFront signs with RSA keys only")
    return key


class CloudFrontUrls:
    """https://<domain>/<key>?Expires=...&Signature=...&Key-Pair-Id=... for an object key."""

    def __init__(
        self, domain: str, key_pair_id: str, private_key: rsa.RSAPrivateKey,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:  # fmt: skip
        self._base = f"https://{domain.strip('/')}"
        self._now = now

        def sign(message: bytes) -> bytes:
            return private_key.sign(message, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - CloudFront's algorithm

        self._signer = CloudFrontSigner(key_pair_id, sign)

    def __repr__(self) -> str:
        return f"CloudFrontUrls({self._base!r})"

    def signed_url(self, key: str, expires_in: int) -> str:
        url = f"{self._base}/{quote(key, safe='/')}"
        return self._signer.generate_presigned_url(url, date_less_than=self._now() + timedelta(seconds=expires_in))


class ObjectsThatExist(Protocol):
    async def exists(self, key: str) -> bool: ...


class CdnSignedObjects:
    """An object store whose URLs are CloudFront's (image_urls.SignedObjects)."""

    def __init__(self, objects: ObjectsThatExist, urls: CloudFrontUrls) -> None:
        self._objects = objects
        self._urls = urls

    async def exists(self, key: str) -> bool:
        return await self._objects.exists(key)

    async def presigned_get_url(self, key: str, expires_in: int) -> str:
        return self._urls.signed_url(key, expires_in)

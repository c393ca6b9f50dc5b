"""What every provider client shares over HTTP, so no client copies it.

- one classification of HTTP failures (status -> TRANSIENT / USER / SERVER), which each
  client refines only where its vendor documents an exception (OpenAI's 429
  insufficient_quota, OpenRouter's 403 moderation, Gemini's daily quota);
- sending a request with a bounded body and transport errors turned into ProviderUnavailable;
- JSON read with exact decimals (vendor costs are money), base64 and data-URL decoding, and
  image validation off the event loop;
- a small Server-Sent Events reader for streamed previews.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import httpx

from services.image.catalog import ProviderName
from services.image.providers.base import GeneratedImage, ImageInput
from services.image.providers.download import ImageDownloader, image_from_bytes
from services.image.providers.errors import (
    FailureKind,
    InvalidRequest,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
)
from shared.retry import parse_retry_after

log = logging.getLogger(__name__)

# An answer carrying base64 images is about 4/3 of the images' size; a vendor (or a broken
# proxy) that sends more than this per image is cut off instead of filling our memory.
MAX_BYTES_PER_IMAGE = 24 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_SSE_EVENT_BYTES = 32 * 1024 * 1024

# 409 and 425 mean "not now", like 408 and 429; 501 and 505 will not change on a retry.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})
PERMANENT_SERVER_ERRORS = frozenset({501, 505})
# Our key, our money, our permissions: the player did nothing wrong.
ACCOUNT_STATUSES = frozenset({401, 402, 403, 407})


def failure_kind_for_status(status: int) -> FailureKind:
    """The one HTTP classification every provider client starts from."""
    if status in TRANSIENT_STATUSES or (status >= 500 and status not in PERMANENT_SERVER_ERRORS):
        return FailureKind.TRANSIENT
    if status in ACCOUNT_STATUSES or status in PERMANENT_SERVER_ERRORS or status in (404, 405, 410):
        # 404/405/410: a wrong base URL or a model the vendor withdrew, ours to fix.
        return FailureKind.SERVER
    return FailureKind.USER  # 400, 413, 415, 422...: the request's own parameters


@dataclass(frozen=True)
class ApiError:
    """What a vendor said when it refused a call, read from any of the usual error shapes."""

    status: int
    message: str
    code: str | None = None  # the vendor's code, type or status name
    body: Mapping[str, Any] = field(default_factory=dict)  # the error object itself
    retry_after: float | None = None


def error_for_status(provider: str, error: ApiError, *, kind: FailureKind | None = None) -> ProviderError:
    """The ProviderError the common table gives an HTTP failure (or `kind`, where a client knows better)."""
    kind = kind or failure_kind_for_status(error.status)
    reason = f"{provider}: HTTP {error.status}: {error.message}"
    options = {"status": error.status, "code": error.code, "provider": provider, "retry_after": error.retry_after}
    if kind is FailureKind.TRANSIENT:
        return ProviderUnavailable(reason, **options)
    if kind is FailureKind.USER:
        return InvalidRequest(reason, **options)
    if error.status in ACCOUNT_STATUSES:
        return ProviderAccountUnusable(reason, **options)
    return ProviderError(reason, kind=FailureKind.SERVER, **options)


def read_api_error(response: httpx.Response, body: bytes) -> ApiError:
    """OpenAI, OpenRouter and Gemini answer {"error": {...}}, Recraft {"code", "message"},
    Stability {"id", "name", "message"}; some proxies answer HTML. All become an ApiError."""
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    try:
        parsed = json.loads(body)
    except ValueError:
        text = body[:200].decode("utf-8", "replace").strip()
        return ApiError(response.status_code, text or response.reason_phrase, retry_after=retry_after)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        obj = error
    elif isinstance(error, str):
        obj = {"message": error}
    elif isinstance(parsed, dict):
        obj = parsed
    else:
        obj = {"message": str(parsed)[:200]}
    return ApiError(response.status_code, error_message(obj) or response.reason_phrase, error_code(obj), obj, retry_after)


def error_message(obj: Mapping[str, Any]) -> str:
    for key in ("message", "detail", "error", "name", "code"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def error_code(obj: Mapping[str, Any]) -> str | None:
    for key in ("code", "type", "status", "name"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class Answer:
    """A successful answer's status, headers and (bounded) body."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self, provider: str) -> dict[str, Any]:
        return parse_json_object(self.body, provider)


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider: str,
    max_bytes: int,
    timeout: float,
    **request: Any,
) -> tuple[httpx.Response, bytes]:
    """One HTTP exchange; the response and its body, read up to `max_bytes`.

    Transport failures and timeouts become ProviderUnavailable; the status is the caller's
    to judge (some vendors put errors in a 200 body).
    """
    try:
        async with client.stream(method, url, timeout=timeout, **request) as response:
            limit = max_bytes if response.status_code < 400 else MAX_ERROR_BODY_BYTES
            body = await read_bounded(response, limit, provider, cut_off=response.status_code >= 400)
    except httpx.TimeoutException:
        raise ProviderUnavailable(f"{provider}: request timed out", provider=provider) from None
    except httpx.TransportError as error:
        raise ProviderUnavailable(f"{provider}: {type(error).__name__}", provider=provider) from None
    return response, body


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, method: str, url: str, *, provider: str, timeout: float, **request: Any
) -> AsyncIterator[httpx.Response]:
    """A streamed exchange (server-sent events); transport failures become ProviderUnavailable."""
    try:
        async with client.stream(method, url, timeout=timeout, **request) as response:
            yield response
    except httpx.TimeoutException:
        raise ProviderUnavailable(f"{provider}: stream timed out", provider=provider) from None
    except httpx.TransportError as error:
        raise ProviderUnavailable(f"{provider}: stream broke: {type(error).__name__}", provider=provider) from None


async def read_bounded(response: httpx.Response, limit: int, provider: str, *, cut_off: bool = False) -> bytes:
    """The body up to `limit` bytes; beyond it SERVER error, or (cut_off) the first `limit` bytes."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            if cut_off:
                return bytes(body[:limit])
            raise ProviderError(f"{provider}: answer larger than {limit} bytes", kind=FailureKind.SERVER, provider=provider)
    return bytes(body)


def parse_json_object(body: bytes, provider: str) -> dict[str, Any]:
    """A JSON object with every number that has a fraction read as an exact Decimal."""
    try:
        parsed = json.loads(body, parse_float=Decimal)
    except ValueError:
        # A 200 that is not JSON is what a proxy in trouble sends; a later try may get through.
        raise ProviderUnavailable(f"{provider}: answer is not JSON", provider=provider) from None
    if not isinstance(parsed, dict):
        raise ProviderError(f"{provider}: answer is not a JSON object", kind=FailureKind.SERVER, provider=provider)
    return parsed


def decode_base64(text: Any, provider: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise ProviderError(f"{provider}: image data is missing", kind=FailureKind.SERVER, provider=provider)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProviderError(f"{provider}: image data is not valid base64", kind=FailureKind.SERVER, provider=provider) from None


_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


def decode_data_url(url: str, provider: str) -> bytes:
    """The bytes of a `data:image/png;base64,...` URL (the type is checked on the bytes later)."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise ProviderError(f"{provider}: image URL is not a base64 data URL", kind=FailureKind.SERVER, provider=provider)
    return decode_base64(url[match.end() :], provider)


def data_url(image: ImageInput) -> str:
    return f"data:{image.content_type};base64,{base64.b64encode(image.data).decode('ascii')}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def validate_image(data: bytes, provider: str) -> GeneratedImage:
    """Checks the bytes are an image and reads its real size; SERVER error otherwise."""
    try:
        return image_from_bytes(data)
    except ProviderError as error:
        raise ProviderError(f"{provider}: {error.reason}", kind=FailureKind.SERVER, provider=provider) from None


async def decode_images(payloads: list[bytes], provider: str) -> tuple[GeneratedImage, ...]:
    """Validates each image in a worker thread: decoding megabytes must not stall the loop."""
    return tuple(await asyncio.gather(*(asyncio.to_thread(validate_image, data, provider) for data in payloads)))


async def decode_base64_images(texts: list[Any], provider: str) -> tuple[GeneratedImage, ...]:
    def decode_and_validate(text: Any) -> GeneratedImage:
        return validate_image(decode_base64(text, provider), provider)

    return tuple(await asyncio.gather(*(asyncio.to_thread(decode_and_validate, text) for text in texts)))


def dollars_to_microdollars(amount: Any) -> int:
    """An exact dollar amount (a Decimal from parse_json_object, an int, a numeric string)
    as whole micro-dollars, rounded half up; 0 for anything that is not a finite amount."""
    try:
        value = Decimal(str(amount)) if not isinstance(amount, Decimal) else amount
        micro = (value * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    except (InvalidOperation, ValueError, TypeError):
        return 0
    return int(micro) if micro.is_finite() and micro >= 0 else 0


def tokens_cost_microdollars(tokens: int, dollars_per_million: Decimal) -> Decimal:
    """Exact micro-dollars for `tokens` at a price per million tokens (sum, then round once)."""
    return Decimal(max(tokens, 0)) * dollars_per_million


def round_microdollars(amount: Decimal) -> int:
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def as_int(value: Any) -> int:
    """A token count or credit figure from a vendor's JSON; 0 when missing or malformed."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, Decimal) and value.is_finite():
        return max(int(value), 0)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return 0


@dataclass(frozen=True)
class SseEvent:
    event: str  # "message" when the server named none
    data: str


async def iter_sse(response: httpx.Response, provider: str) -> AsyncIterator[SseEvent]:
    """Server-sent events as the HTML standard frames them: `event:`/`data:` lines, a blank
    line ends an event, `:` lines are comments. One event is capped at MAX_SSE_EVENT_BYTES."""
    event_name = ""
    data_lines: list[str] = []
    size = 0
    async for line in response.aiter_lines():
        if not line:
            if data_lines:
                yield SseEvent(event_name or "message", "\n".join(data_lines))
            event_name, data_lines, size = "", [], 0
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        size += len(value)
        if size > MAX_SSE_EVENT_BYTES:
            raise ProviderError(f"{provider}: streamed event too large", kind=FailureKind.SERVER, provider=provider)
        if name == "event":
            event_name = value
        elif name == "data":
            data_lines.append(value)
    if data_lines:
        yield SseEvent(event_name or "message", "\n".join(data_lines))


def require_key(api_key: str | None, variable: str, provider: str) -> str:
    """The key, or ProviderNotConfigured naming the variable (before any HTTP call)."""
    if not api_key:
        raise ProviderNotConfigured(f"{variable} is not set", provider=provider)
    return api_key


class VendorClient:
    """What every vendor client is apart from its API: a key, an endpoint, a timeout, the
    process's HTTP client (or one of its own per call, for scripts and tests), a downloader."""

    name: ProviderName
    key_variable = ""
    default_base_url = ""
    default_timeout = 60.0

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float | None = None,
        downloader: ImageDownloader | None = None,
    ) -> None:
        self._api_key = api_key or None
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self._client = client
        self.timeout = timeout or self.default_timeout
        self._downloader = downloader or ImageDownloader(client)

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, api_key={'set' if self._api_key else 'missing'})"

    def _key(self) -> str:
        return require_key(self._api_key, self.key_variable, self.name)

    async def _post(self, url: str, *, headers: dict[str, str], max_bytes: int, **body: Any) -> dict[str, Any]:
        """POSTs `body` (json=..., or data= and files=); the answer's JSON object, or the
        ProviderError `_classify` makes of the vendor's refusal."""
        async with self._http() as client:
            response, raw = await send(
                client, "POST", url, provider=self.name, max_bytes=max_bytes, timeout=self.timeout,
                headers=headers, **body,
            )  # fmt: skip
        if response.status_code >= 400:
            error = read_api_error(response, raw)
            log.warning(
                "provider.request_failed",
                extra={"provider": str(self.name), "status": error.status, "code": error.code, "error": error.message},
            )
            raise self._classify(error)
        return parse_json_object(raw, self.name)

    def _classify(self, error: ApiError) -> ProviderError:
        """The vendor's refusal as a ProviderError; clients override it where their API
        documents exceptions to the common table."""
        return error_for_status(self.name, error)

    @contextlib.asynccontextmanager
    async def _http(self) -> AsyncIterator[httpx.AsyncClient]:
        if self._client is not None:
            yield self._client
            return
        async with httpx.AsyncClient() as client:
            yield client

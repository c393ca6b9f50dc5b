"""The page tokens of every List method: where a page ended, bound to the list it came from.

A token is URL-safe base64 of a small JSON object: the list's key (a digest of the user and
of the filter, so a token of another user's or another filter's list is refused) beside the
fields the service needs to resume (a time and an id, a sequence number). Tokens are not
signed: a forged one can only page through the caller's own list, which every query filters
by user anyway. Each service checks the fields it reads and words its own refusal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Far beyond any token a service makes: a longer one is refused before it is decoded.
MAX_TOKEN_CHARS = 512


def list_key(user_id: str, scope: str | None = None) -> str:
    """The key of one user's list, under one filter for a method that has filters (`scope`:
    the filter spelled stably, '' for none; None for a method without filters)."""
    named = user_id if scope is None else f"{user_id}\x1f{scope}"
    return hashlib.sha256(named.encode()).hexdigest()[:16]


def encode(fields: Mapping[str, Any]) -> str:
    raw = json.dumps(dict(fields), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str) -> Any | None:
    """The JSON value inside `token`; None when it is none at all (too long, not base64, not
    JSON). The caller checks its shape."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None

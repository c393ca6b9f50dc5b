"""The rules every service applies to ids and free text that callers send.

One rule for a user_id (and every other caller-chosen id) in every service, so an id the
story service takes is never refused by credits or image. Each function answers why a
value is unusable, or None; the service raises its own InvalidArgument naming the field.
Nothing is stripped or rewritten silently: " u1" and "u1" are different ids, so the first
is refused instead of quietly becoming the second.
"""

from __future__ import annotations

import unicodedata

MAX_ID_CHARS = 128
# Separators that end a line in some reader (a log viewer, a terminal) as \n would.
_LINE_SEPARATORS = frozenset("\u2028\u2029\u0085")
# The embeddings, overrides and isolates that reorder how the text around them is shown
# ("Trojan source", CVE-2021-42574): in a case file or a reason they only ever disguise what
# an admin page or a log shows. The plain marks (LRM, RLM, ALM), common in text written
# right to left, stay allowed.
_DIRECTION_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def id_problem(value: str, *, max_chars: int = MAX_ID_CHARS) -> str | None:
    """Why `value` cannot be an id (user_id, request_id, ...), or None when it can."""
    if not value:
        return "must not be empty"
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters"
    if value != value.strip():
        return "must not start or end with whitespace"
    if _has_control_characters(value, allowed=""):
        return "must not contain control characters"
    if any(unicodedata.category(char) == "Cf" for char in value):
        # Zero-width characters, text-direction marks, a byte-order mark: "u1\u200b" shows
        # as "u1" and would be another player.
        return "must not contain invisible format characters (zero-width or text-direction marks)"
    return None


def optional_id_problem(value: str, *, max_chars: int = MAX_ID_CHARS) -> str | None:
    """As id_problem, but empty means "not given" and is fine."""
    return None if value == "" else id_problem(value, max_chars=max_chars)


def text_problem(value: str, *, max_chars: int, allowed_controls: str = "", required: bool = True) -> str | None:
    """Why free text (a title, a prompt, a chapter) is unusable, or None.

    PostgreSQL text cannot hold NUL, and other control characters in a case file only ever
    mean a bug or an attack on whoever displays it; `allowed_controls` lets chapter text
    keep its newlines and tabs.
    """
    if required and not _has_visible(value):
        return "must not be empty"
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters"
    if _has_control_characters(value, allowed=allowed_controls):
        return "must not contain control characters" + (
            f" (except {_describe(allowed_controls)})" if allowed_controls else ""
        )
    if any(char in _DIRECTION_CONTROLS for char in value):
        return "must not contain text-direction controls"
    return None


def _has_visible(value: str) -> bool:
    """Whether `value` has a character that is neither whitespace nor an invisible format
    character (a reason that is only a zero-width joiner is empty). Text keeps those
    characters otherwise: a joiner builds emoji, a non-joiner spells Persian. Stops at the
    first visible one, so a long chapter costs no more than a short one."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in value)


def _has_control_characters(value: str, *, allowed: str) -> bool:
    return any(
        (unicodedata.category(char) == "Cc" or char in _LINE_SEPARATORS) and char not in allowed
        for char in value
    )


def _describe(controls: str) -> str:
    names = {"\n": "newline", "\t": "tab", "\r": "carriage return"}
    return " and ".join(names.get(char, repr(char)) for char in controls)

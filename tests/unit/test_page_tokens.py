"""The page-token codec every List method shares."""

import hashlib

import pytest

from shared import page_tokens


def test_a_token_round_trips_and_names_its_list():
    token = page_tokens.encode({"k": page_tokens.list_key("u1", "status=2"), "s": 41})

    assert page_tokens.decode(token) == {"k": page_tokens.list_key("u1", "status=2"), "s": 41}
    assert "=" not in token and "+" not in token and "/" not in token


def test_list_keys_are_the_ones_tokens_already_carried():
    # Tokens given out before the codec was shared keep resuming their walks.
    assert page_tokens.list_key("u1") == hashlib.sha256(b"u1").hexdigest()[:16]
    assert page_tokens.list_key("u1", "s") == hashlib.sha256(b"u1\x1fs").hexdigest()[:16]
    assert page_tokens.list_key("u1", "") == hashlib.sha256(b"u1\x1f").hexdigest()[:16]  # jobs, no filter
    assert page_tokens.list_key("u1", "a") != page_tokens.list_key("u1", "b") != page_tokens.list_key("u2", "b")


@pytest.mark.parametrize("token", ["garbage!", "e30" * 200, "\u00e9t\u00e9", "bm90IGpzb24", ""])
def test_what_is_no_token_decodes_to_none(token):
    assert page_tokens.decode(token) is None

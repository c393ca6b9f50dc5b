"""The id and text rules every service shares."""

import pytest

from shared.validation import MAX_ID_CHARS, id_problem, optional_id_problem, text_problem


@pytest.mark.parametrize("value", ["u1", "user-42", "ü∂ñí", "a" * MAX_ID_CHARS, "with inner space"])
def test_ids_that_are_fine(value):
    assert id_problem(value) is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "must not be empty"),
        ("a" * (MAX_ID_CHARS + 1), f"must be at most {MAX_ID_CHARS} characters"),
        (" u1", "must not start or end with whitespace"),
        ("u1\n", "must not start or end with whitespace"),
        ("   ", "must not start or end with whitespace"),
        ("u\x001", "must not contain control characters"),
        ("u\x1b[31m", "must not contain control characters"),
        ("u\x7f", "must not contain control characters"),
        ("u\x85x", "must not contain control characters"),
        ("u\u2028x", "must not contain control characters"),
    ],
)
def test_ids_that_are_refused_say_why(value, problem):
    assert id_problem(value) == problem


def test_optional_id_may_be_empty_but_not_bad():
    assert optional_id_problem("") is None
    assert optional_id_problem(" x") == "must not start or end with whitespace"


def test_text_keeps_allowed_controls_only():
    assert text_problem("line one\n\tline two", max_chars=100, allowed_controls="\n\t") is None
    assert text_problem("nul\x00", max_chars=100, allowed_controls="\n\t") == (
        "must not contain control characters (except newline and tab)"
    )
    assert text_problem("a\nb", max_chars=100) == "must not contain control characters"
    assert text_problem("  ", max_chars=100) == "must not be empty"
    assert text_problem("", max_chars=100, required=False) is None
    assert text_problem("abcd", max_chars=3) == "must be at most 3 characters"

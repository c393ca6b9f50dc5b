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
        ("u1\u200b", "must not contain invisible format characters (zero-width or text-direction marks)"),
        ("\ufeffu1", "must not contain invisible format characters (zero-width or text-direction marks)"),
        ("admin\u202egnp.exe", "must not contain invisible format characters (zero-width or text-direction marks)"),
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


def test_text_refuses_direction_controls_but_keeps_joiners():
    assert text_problem("evil\u202etxt.exe", max_chars=100) == "must not contain text-direction controls"
    assert text_problem("a \u2066b\u2069", max_chars=100) == "must not contain text-direction controls"
    # A zero-width joiner builds emoji, a non-joiner spells Persian; alone they say nothing.
    assert text_problem("\U0001f468\u200d\U0001f469\u200d\U0001f467", max_chars=100) is None
    assert text_problem("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", max_chars=100) is None
    # The plain direction marks are everyday right-to-left text, unlike the overrides.
    assert text_problem("\u05e9\u05dc\u05d5\u05dd\u200f!", max_chars=100) is None
    assert text_problem("\u200d", max_chars=100) == "must not be empty"
    assert text_problem(" \u200b ", max_chars=100) == "must not be empty"

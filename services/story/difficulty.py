"""How hard a case file is to type: a deterministic estimate from its text alone, 0 to 100.

Every character costs keystrokes and reach (KEY_COST): a common lowercase letter 1, a less
common one a little more, a rare one (k j x q z) more again, a capital letter its letter plus
the shift key, a digit the reach to the top row, punctuation more (shifted punctuation the
most), a space less than a letter; any character a keyboard does not have at all (only old
stories can hold one) costs the most. The text's effort is the mean cost of its characters
times a factor for its mean word length (long words are harder to hold in mind and type
without a slip than the same letters in short ones), and the difficulty is that effort
placed on a scale from EASIEST_EFFORT (0) to HARDEST_EFFORT (100), rounded and clamped.

The same text always scores the same: no randomness, no model, no locale.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

from services.story.model import Chapter

SPACE_COST = 0.6
NEWLINE_COST = 1.2
COMMON_LETTER_COST = 1.0  # e t a o i n s h r d l u
LESS_COMMON_LETTER_COST = 1.2  # c m f w y p g b v
RARE_LETTER_COST = 1.6  # k j x q z
SHIFT_COST = 0.8
DIGIT_COST = 1.8
PUNCTUATION_COST = 1.5  # . , ; ' / -
SHIFTED_PUNCTUATION_COST = 2.2  # ! ? : " ( ) & % $
OFF_KEYBOARD_COST = 3.0
# Word-length factor: 1 at 4.5 letters (English prose), +/- 8 % per letter, within bounds.
USUAL_WORD_LENGTH = 4.5
WORD_LENGTH_WEIGHT = 0.08
WORD_FACTOR_BOUNDS = (0.85, 1.5)
EASIEST_EFFORT = 0.75
HARDEST_EFFORT = 1.75

_COMMON = frozenset("etaoinshrdlu")
_LESS_COMMON = frozenset("cmfwypgbv")
_UNSHIFTED_PUNCTUATION = frozenset(".,;'/-")
_SHIFTED_PUNCTUATION = frozenset('!?:"()&%$')
_WORD = re.compile(r"[A-Za-z0-9]+")


def _letter_cost(lower: str) -> float:
    if lower in _COMMON:
        return COMMON_LETTER_COST
    if lower in _LESS_COMMON:
        return LESS_COMMON_LETTER_COST
    return RARE_LETTER_COST


def _key_costs() -> dict[str, float]:
    costs = {" ": SPACE_COST, "\n": NEWLINE_COST}
    for letter in string.ascii_lowercase:
        costs[letter] = _letter_cost(letter)
        costs[letter.upper()] = _letter_cost(letter) + SHIFT_COST
    costs.update(dict.fromkeys(string.digits, DIGIT_COST))
    costs.update(dict.fromkeys(_UNSHIFTED_PUNCTUATION, PUNCTUATION_COST))
    costs.update(dict.fromkeys(_SHIFTED_PUNCTUATION, SHIFTED_PUNCTUATION_COST))
    return costs


KEY_COST = _key_costs()


def typing_difficulty(text: str) -> int:
    """0 (easiest) to 100 (hardest) for `text`; 0 for an empty text."""
    if not text:
        return 0
    char_effort = sum(KEY_COST.get(char, OFF_KEYBOARD_COST) for char in text) / len(text)
    words = _WORD.findall(text)
    mean_word_length = sum(map(len, words)) / len(words) if words else USUAL_WORD_LENGTH
    low, high = WORD_FACTOR_BOUNDS
    word_factor = min(high, max(low, 1 + WORD_LENGTH_WEIGHT * (mean_word_length - USUAL_WORD_LENGTH)))
    scaled = (char_effort * word_factor - EASIEST_EFFORT) / (HARDEST_EFFORT - EASIEST_EFFORT)
    return round(min(1.0, max(0.0, scaled)) * 100)


def story_typing_difficulty(title: str, chapters: Iterable[Chapter]) -> int:
    """The difficulty of everything a player types in a case file: its title and chapters."""
    return typing_difficulty("\n".join([title, *(f"{chapter.title}\n{chapter.text}" for chapter in chapters)]))

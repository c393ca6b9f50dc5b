"""The typing-difficulty estimate: deterministic, bounded, and higher for harder text."""

from __future__ import annotations

import pytest

from services.story.difficulty import story_typing_difficulty, typing_difficulty
from services.story.model import Chapter

PLAIN = "the cat sat on the mat and the dog ran to the sun and then it slept"


@pytest.mark.parametrize(
    ("easier", "harder"),
    [
        (PLAIN, "The Cat Sat On The Mat And The Dog Ran To The Sun And Then It Slept"),  # capitals
        (PLAIN, "the cat sat on the mat, and the dog ran; to the sun. then it slept."),  # punctuation
        ("the cat sat on the mat, and the dog ran", 'the cat (sat) on the mat: "and" the dog ran?'),  # shifted
        ("the cat sat on the mat and the dog ran", "the cat sat on 12 mats and 30 dogs ran 4 laps"),  # digits
        ("the hen had a red hat and a tan tail", "the jinx quiz vexed a lazy kook at the zoo"),  # rare letters
        ("it is so and he is at it as we go on", "institutional hydrotherapy administered continuously"),  # word length
        ("She arrived at night.", "Quixotic Zephyr-Jinx, 1897: 'Kvetch!' (42%)"),  # all at once
    ],
)
def test_harder_text_scores_higher(easier, harder):
    assert typing_difficulty(easier) < typing_difficulty(harder)


def test_the_same_text_always_scores_the_same_and_stays_in_bounds():
    texts = ["", " ", "a", PLAIN, "Z" * 500, "$%&!?" * 100, "\u00e9\u201c" * 10, "x" * 20_000]
    scores = [typing_difficulty(text) for text in texts]
    assert scores == [typing_difficulty(text) for text in texts]
    assert all(0 <= score <= 100 for score in scores)
    assert typing_difficulty("") == 0
    assert typing_difficulty("$%&!?" * 100) == 100


def test_a_story_scores_its_title_and_chapters():
    chapters = [Chapter("Admission", "She came at night."), Chapter("Night Log", "Ward 9, 3:14 A.M.: \"Who?\"")]
    assert story_typing_difficulty("Ward Nine", chapters) == typing_difficulty(
        "Ward Nine\nAdmission\nShe came at night.\nNight Log\nWard 9, 3:14 A.M.: \"Who?\""
    )
    assert story_typing_difficulty("Ward Nine", chapters[:1]) < story_typing_difficulty("Ward Nine", chapters)

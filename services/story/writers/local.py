"""The `local` writer: asylum case files assembled from word lists, no network, no key.

Everything is plain ASCII because players type these texts on ordinary keyboards.
"""

from __future__ import annotations

import random
from typing import Any

WOMEN = [
    "Agnes", "Edith", "Mabel", "Clara", "Ada", "Harriet",
    "Lavinia", "Ottilie", "Beatrice", "Hester", "Ida", "Rosalind",
]  # fmt: skip
MEN = [
    "Silas", "Ezra", "Thaddeus", "Ambrose", "Cornelius", "Jonah",
    "Abel", "Lucius", "Wendell", "Percival", "Josiah", "Elias",
]  # fmt: skip
SURNAMES = [
    "Marsh", "Blackwood", "Hale", "Crane", "Thorne", "Whitlock", "Ashby", "Graves",
    "Pike", "Vance", "Holloway", "Stroud", "Kettering", "Winslow", "Dunmore", "Fenwick",
]  # fmt: skip
DIAGNOSES = [
    "melancholia with persistent night terrors",
    "catatonic stupor",
    "dementia praecox",
    "chronic somnambulism",
    "religious mania",
    "paranoid delusions of being watched",
    "nervous exhaustion with auditory hallucinations",
    "mutism following an unexplained fright",
    "compulsive counting and ritual washing",
    "the delusion of a second self",
]
BUILDS = [
    "gaunt", "stooped", "unnaturally still", "tall and hollow-cheeked", "small and restless", "heavy-set and trembling",
]  # fmt: skip
HAIR = [
    "grey hair cropped to the scalp",
    "long black hair matted with ash",
    "thin white hair",
    "a shaved head crossed by an old scar",
    "red hair pulled out in patches",
]
EYES = [
    "pale, unblinking eyes",
    "eyes ringed with dark bruises",
    "one clouded eye",
    "eyes that never quite focus",
    "red-rimmed eyes that follow the lamp",
]
DETAILS = [
    "a straitjacket with frayed straps",
    "a stained hospital gown",
    "bandaged hands",
    "ink-stained fingers",
    "a rosary wound tight around one wrist",
    "bite marks along the forearm",
]
ASYLUMS = [
    "Ashgrove Asylum",
    "Saint Dymphna Hospital for the Insane",
    "Blackmoor State Hospital",
    "Hollow Pines Sanatorium",
    "Wrenfield Lunatic Asylum",
    "Greywater Institution",
]
DOCTORS = ["Dr. Albrecht", "Dr. Penhallow", "Dr. Sayer", "Dr. Morrow", "Dr. Quill", "Dr. Harrow"]
WARDS = ["Ward C", "the east wing", "the isolation cells", "the hydrotherapy room", "the old chapel", "the infirmary"]
OMENS = [
    "the sound of scratching inside the walls",
    "a humming that only starts after midnight",
    "wet footprints that lead into a locked room",
    "a name written on every page of the ward journal",
    "a music box that nobody owns",
    "a draught that smells of lilies and turned earth",
]
CHAPTER_TITLES = (
    ["Admission", "Intake", "The First Night"],
    ["Observation", "Treatment", "The Interviews"],
    ["The Last Entry", "No Discharge", "What Remains"],
)
TITLES = [
    "The {surname} File",
    "Case {number}: {name}",
    "What {ward_title} Heard",
    "The Patient in {ward_title}",
    "Admission {number}",
]

# Paragraph templates, one sentence per line; {slots} come from _patient_facts.
ADMISSION = [
    "{name} was admitted to {asylum} on a wet night in {year}, "
    "delivered by two constables who would not give their names. "
    "The intake ledger lists the patient as {age} years of age and notes {diagnosis}. "
    "The night porter wrote in the margin that the patient smiled the whole time the papers were signed.",
    "The family of {name} brought the patient to {asylum} in the autumn of {year} "
    "and left before the gates were locked. "
    "{doctor} recorded {diagnosis} and a pulse that was slow and strangely regular. "
    "Asked why the family had come, the patient said only that the house had grown too quiet.",
]
FIRST_IMPRESSIONS = [
    "On examination the patient is {appearance}. "
    "The attendants report that {pronoun} does not sleep when the lamps are lit, "
    "and does not stop talking when they are put out.",
    "The patient presents as {appearance}. "
    "{pronoun_title} answers every question politely and correctly, "
    "and then repeats the answer under {possessive} breath for an hour.",
]
ARRIVAL_OMENS = [
    "That first week the staff of {ward} began to complain of {omen}. "
    "Nobody connected it to the new admission. "
    "Nobody wanted to.",
    "Within days the night nurses on {ward} asked to be moved. "
    "They spoke of {omen}, and of the patient waiting by the door as if expecting a visitor.",
]
TREATMENTS = [
    "{doctor} prescribed cold baths, bromide and silence. "
    "The baths were stopped after the third attendant refused to hold the patient under, "
    "saying the water had gone black around {possessive} hands.",
    "The treatment was rest, a bland diet and daily interviews with {doctor}. "
    "The transcripts of those interviews are missing from this file. "
    "In their place is a single sheet covered in the same word, written smaller and smaller until it cannot be read.",
]
OBSERVATIONS = [
    "The patient keeps count of something. "
    "{pronoun_title} taps the wall {count} times before meals, {count} times before sleep, "
    "and once, very softly, whenever someone new enters the room.",
    "The patient draws. "
    "Every drawing shows {ward} from above, as if seen from the ceiling, "
    "and every drawing has one more figure in it than the last.",
]
THEME_NOTES = [
    "Every note in this file comes back, sooner or later, to {theme}. "
    "The doctors wrote it down without comment. "
    "The patient never once said it aloud.",
    "When asked what frightens {object}, the patient answered: {theme}. "
    "When asked what {pronoun} meant, {pronoun} laughed until {pronoun} wept.",
]
LAST_NIGHTS = [
    "On the last night recorded, the lamps in {ward} went out at a quarter past two. "
    "The attendant on duty heard {omen}, and then heard the patient say goodnight to someone by name.",
    "The final entry is dated the winter of {next_year}. "
    "It reports that the door of the patient's room was found locked from the inside, the bed made, "
    "and the window painted over from the outside.",
]
ENDINGS = [
    "No discharge was ever signed. "
    "{asylum} closed its doors years later, but the caretakers still refuse to walk past {ward} after dark.",
    "The file was sealed by order of {doctor}. "
    "Someone opened it again. "
    "The last page is newer than the rest, and the handwriting is the patient's.",
]
CLOSINGS = [
    "If you are reading this, the case is not closed. "
    "It is only waiting for someone else to finish it.",
    "Whoever types these words last should not look up from the page until the lamp stops flickering.",
]


class LocalWriter:
    """Deterministic for a given seed and theme: the same pair always gives the same story."""

    name = "local"

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        rng = random.Random(f"{seed}\x00{theme or ''}")
        facts = _patient_facts(rng, theme)
        return {
            "title": rng.choice(TITLES).format(**facts),
            "patient": {
                "name": facts["name"],
                "age": facts["age"],
                "diagnosis": facts["diagnosis"],
                "appearance": facts["appearance"],
            },
            "chapters": _chapters(rng, facts),
            "image_generation_prompt": _image_prompt(facts),
        }


def _patient_facts(rng: random.Random, theme: str | None) -> dict[str, Any]:
    is_woman = rng.random() < 0.5
    first = rng.choice(WOMEN if is_woman else MEN)
    surname = rng.choice(SURNAMES)
    ward = rng.choice(WARDS)
    year = rng.randrange(1871, 1939)
    appearance = f"{rng.choice(BUILDS)}, with {rng.choice(HAIR)}, {rng.choice(EYES)} and {rng.choice(DETAILS)}"
    return {
        "name": f"{first} {surname}",
        "surname": surname,
        "is_woman": is_woman,
        "age": rng.randrange(17, 78),
        "diagnosis": rng.choice(DIAGNOSES),
        "appearance": appearance,
        "asylum": rng.choice(ASYLUMS),
        "doctor": rng.choice(DOCTORS),
        "ward": ward,
        "ward_title": ward.title(),
        "year": year,
        "next_year": year + rng.randrange(1, 4),
        "number": rng.randrange(100, 1000),
        "count": rng.choice(["three", "seven", "nine", "thirteen"]),
        "omen": rng.choice(OMENS),
        "theme": (theme or "").strip(),
        "pronoun": "she" if is_woman else "he",
        "pronoun_title": "She" if is_woman else "He",
        "possessive": "her" if is_woman else "his",
        "object": "her" if is_woman else "him",
    }


def _chapters(rng: random.Random, facts: dict[str, Any]) -> list[dict[str, str]]:
    middle = [rng.choice(TREATMENTS), rng.choice(OBSERVATIONS)]
    if facts["theme"]:
        middle.append(rng.choice(THEME_NOTES))
    plan = [
        [rng.choice(ADMISSION), rng.choice(FIRST_IMPRESSIONS), rng.choice(ARRIVAL_OMENS)],
        middle,
        [rng.choice(LAST_NIGHTS), rng.choice(ENDINGS), rng.choice(CLOSINGS)],
    ]
    return [
        {"title": rng.choice(titles), "text": "\n\n".join(paragraph.format(**facts) for paragraph in paragraphs)}
        for titles, paragraphs in zip(CHAPTER_TITLES, plan, strict=True)
    ]


def _image_prompt(facts: dict[str, Any]) -> str:
    person = "woman" if facts["is_woman"] else "man"
    return (
        f"Portrait of a {facts['age']}-year-old {person}, an asylum patient in {facts['year']}, "
        f"{facts['appearance']}. Dim gaslight, peeling plaster walls, grainy black-and-white "
        "photograph, unsettling and quiet, horror atmosphere."
    )

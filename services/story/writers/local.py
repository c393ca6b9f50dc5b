"""The `local` writer: asylum case files assembled from word lists, no network, no key.

Seeded by the request (see StoryWriter.write) and the theme, so the same request always
gives the same story and a hundred requests give a hundred different case files: the
patient, the era (which decides the institution, the treatments, the light and the
photograph of the portrait), the ward, and the shape of the file itself, 3 to 7 chapters
chosen from admission notes, interview transcripts, night logs, letters and more.

Everything is plain ASCII prose because players type these texts on ordinary keyboards.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from typing import Any

from services.story.writers.story_json import MAX_CHAPTERS, MIN_CHAPTERS, typeable_phrase

WOMEN = [
    "Agnes", "Edith", "Mabel", "Clara", "Ada", "Harriet", "Lavinia", "Ottilie", "Beatrice", "Hester",
    "Ida", "Rosalind", "Winifred", "Dorothea", "Maud", "Eliza", "Philippa", "Cordelia", "Florence", "Tabitha",
    "Martha", "Evangeline", "Imogen", "Louisa", "Nora", "Prudence", "Sybil", "Theodora", "Violet", "Wilhelmina",
    "Margery", "Josephine", "Honora", "Lillian", "Constance", "Mercy", "Rebekah", "Alma", "Greta", "Esther",
]  # fmt: skip
MEN = [
    "Silas", "Ezra", "Thaddeus", "Ambrose", "Cornelius", "Jonah", "Abel", "Lucius", "Wendell", "Percival",
    "Josiah", "Elias", "Barnaby", "Clement", "Desmond", "Ephraim", "Gideon", "Horace", "Ignatius", "Jasper",
    "Leopold", "Mortimer", "Obadiah", "Rufus", "Septimus", "Tobias", "Virgil", "Walter", "Alistair", "Bertram",
    "Cyril", "Edmund", "Felix", "Gilbert", "Humphrey", "Isaac", "Lionel", "Osric", "Reuben", "Stanley",
]  # fmt: skip
SURNAMES = [
    "Marsh", "Blackwood", "Hale", "Crane", "Thorne", "Whitlock", "Ashby", "Graves", "Pike", "Vance",
    "Holloway", "Stroud", "Kettering", "Winslow", "Dunmore", "Fenwick", "Aldous", "Birch", "Carrow", "Dray",
    "Everly", "Fairweather", "Gorse", "Hatch", "Ingram", "Jessop", "Kells", "Lusk", "Mallory", "Nettles",
    "Orme", "Pellow", "Quarrie", "Rook", "Sallow", "Tull", "Underhill", "Voss", "Wren", "Yardley",
    "Abernethy", "Bellamy", "Coldwell", "Dancy", "Eckhart", "Fitch", "Gaunt", "Harrow", "Ivers", "Lamb",
]  # fmt: skip
DOCTORS = [
    "Albrecht", "Penhallow", "Sayer", "Morrow", "Quill", "Lindqvist", "Osgood", "Vail", "Ravenscroft", "Ellery",
    "Brand", "Castellan", "Devereux", "Hargreave", "Kessler", "Loame", "Mercer", "Stanton", "Tremaine", "Wick",
]  # fmt: skip
PLACES = [
    "Ashgrove", "Blackmoor", "Hollow Pines", "Wrenfield", "Greywater", "Saint Dymphna", "Coldharbour", "Marrow Hill",
    "Ebbing Vale", "Fallowmere", "Hatherleigh", "Lantern Point", "Mosswood", "Nethercott", "Oakhurst", "Pale Fen",
    "Ravensworth", "Stillwater", "Thornbury", "Upper Weir", "Vespers Cross", "Whitby Moor", "Yewdale", "Brackenridge",
]  # fmt: skip
WARDS = [
    "Ward C", "Ward 9", "the east wing", "the isolation cells", "the hydrotherapy room", "the old chapel",
    "the infirmary", "the women's refractory ward", "the men's chronic ward", "the north attic",
    "the laundry corridor", "the observation gallery", "the night nursery", "the long dormitory",
    "the tuberculosis pavilion", "the cellar baths", "the violent ward", "the convalescent wing",
    "the room at the end of the west corridor", "the boiler-house annex", "the garden cottages",
    "the third-floor landing", "the quiet ward", "the padded room",
]  # fmt: skip
DIAGNOSES = [
    "melancholia with persistent night terrors", "catatonic stupor", "dementia praecox", "chronic somnambulism",
    "religious mania", "paranoid delusions of being watched", "nervous exhaustion with auditory hallucinations",
    "mutism following an unexplained fright", "compulsive counting and ritual washing", "the delusion of a second self",
    "hysteria with fits of laughter", "monomania concerning mirrors", "puerperal insanity", "acute mania",
    "general paralysis of the insane", "moral insanity", "folie a deux, the other party unknown",
    "the belief that the patient has already died", "lycanthropy", "insomnia of eleven weeks",
    "delusions of persecution by the dead", "a fixed idea concerning the number seven", "shell shock",
    "chronic delirium", "the conviction that the house is breathing", "hypochondria of the blood",
    "nostalgic melancholy", "kleptomania of small bones", "visions of a drowned town", "prolonged trance",
    "religious despair", "a fear of being buried alive", "epileptic insanity", "alcoholic delusions",
    "an inability to recognise the faces of family", "the belief that the patient's reflection is late",
]  # fmt: skip
BUILDS = [
    "gaunt", "stooped", "unnaturally still", "tall and hollow-cheeked", "small and restless", "heavy-set and trembling",
    "bird-boned", "broad-shouldered but wasted", "slight and straight-backed", "round-faced and pale as tallow",
]  # fmt: skip
HAIR = [
    "grey hair cropped to the scalp", "long black hair matted with ash", "thin white hair", "a shaved head crossed by an old scar",
    "red hair pulled out in patches", "fair hair plaited too tightly", "a widow's peak of iron-grey hair", "wet-looking dark curls",
    "hair gone white in a single streak", "brittle straw-coloured hair", "a halo of uncombed silver hair", "oiled black hair parted with care",
]  # fmt: skip
EYES = [
    "pale, unblinking eyes", "eyes ringed with dark bruises", "one clouded eye", "eyes that never quite focus",
    "red-rimmed eyes that follow the lamp", "very black, very wet eyes", "eyes of two different colours",
    "eyes that water without tears", "a fixed, polite stare", "eyelids that flutter as if dreaming",
]  # fmt: skip
DETAILS = [
    "a straitjacket with frayed straps", "a stained hospital gown", "bandaged hands", "ink-stained fingers",
    "a rosary wound tight around one wrist", "bite marks along the forearm", "a mourning brooch pinned to the gown",
    "a hospital blanket worn like a shawl", "fingernails worn down to the quick", "a burn scar shaped like a hand",
    "a wedding ring on a string around the neck", "a collar buttoned to the throat", "a cardigan buttoned wrongly",
    "bare feet black with dust",
]  # fmt: skip
KEEPSAKES = [
    "a tin soldier with no face", "a locket holding a photograph of a stranger", "a child's shoe", "a key to no door in the building",
    "a pocket watch that runs backwards", "a hymnal with every page torn out but one", "a doll made of knotted rags",
    "a jar of river water", "a lock of someone else's hair", "a letter that was never opened", "a bird skull wrapped in lace",
    "a spool of red thread", "a broken hand mirror", "a wooden spoon carved with names", "a glove too small for any adult",
    "a railway ticket to a station that closed in 1850", "a brass bell with the clapper removed", "a ribbon from a coffin wreath",
    "a wax apple", "a page of sheet music with no notes on it",
]  # fmt: skip
# In the base form ("I have started to ..."); _third_person makes "the patient ...".
HABITS = [
    "hum the same four notes, over and over, always ending a little flat",
    "sleep under the bed rather than in it",
    "set a second place at every meal",
    "turn every picture in the room to face the wall",
    "stand at the window from dusk until the lamps are lit, waving",
    "answer questions that no one in the room has asked",
    "count the other patients twice each morning, frowning at the total",
    "write on the wall with a wet finger, words that are gone by the time anyone looks",
    "refuse to cross a threshold without first being invited",
    "walk the ward backwards after midnight",
    "keep the blanket pulled over the mirror",
    "speak to the radiator as if it were an old friend",
    "wake at the same minute every night to sit up, listening",
    "bury crusts of bread in the flower beds",
    "laugh at the exact moment the chapel bell begins, before anyone hears it",
    "draw the same door on every scrap of paper",
]
OMENS = [
    "the sound of scratching inside the walls", "a humming that only starts after midnight",
    "wet footprints that lead into a locked room", "a name written on every page of the ward journal",
    "a music box that nobody owns", "a draught that smells of lilies and turned earth",
    "a child laughing in the empty linen room", "lamps that dim whenever the patient is spoken of",
    "frost on the inside of the windows in August", "a bed that is found made after every search",
    "knocking from beneath the floorboards, three and then two", "the smell of candle smoke where no candle burns",
    "a shadow that keeps its place when the lamp is moved", "a clock that stops at the hour of admission",
    "water rising in the drains of the cellar baths", "a voice calling the night nurse by her childhood name",
    "moths gathering on one door only", "a second set of breathing on the night log recordings",
    "a rocking chair that is warm to the touch", "a bell that rings in the disused chapel",
]  # fmt: skip
# What someone is to someone else, by that someone's gender.
KIN = {
    True: ["sister", "mother", "wife", "daughter", "aunt", "niece", "cousin", "grandmother"],
    False: ["brother", "father", "husband", "son", "uncle", "nephew", "cousin", "grandfather"],
}
HOURS = [
    "a quarter past two", "ten minutes to four", "just after three", "midnight exactly", "twenty past one",
    "the hour before dawn", "half past eleven", "four in the morning",
]  # fmt: skip
NUMBERS = ["three", "seven", "nine", "thirteen", "four", "eleven"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December",
]  # fmt: skip


@dataclass(frozen=True)
class Era:
    """What the year of admission decides: the institution, its treatments, its light, its camera."""

    first_year: int
    last_year: int
    institutions: tuple[str, ...]
    treatments: tuple[str, ...]
    light: tuple[str, ...]
    photographs: tuple[str, ...]


ERAS = (
    Era(
        1858, 1889,
        ("Lunatic Asylum", "Asylum for the Insane", "Pauper Lunatic Asylum", "Retreat"),
        ("cold baths and bromide", "blistering of the scalp", "the rotating chair", "bleeding and a diet of gruel",
         "restraint in a crib bed", "laudanum at night and silence by day"),
        ("guttering gaslight", "a single candle", "oil-lamp glow", "grey window light"),
        ("wet-plate collodion photograph", "faded albumen print", "carte de visite with foxed edges"),
    ),
    Era(
        1890, 1919,
        ("Asylum", "Hospital for the Insane", "Mental Hospital", "County Asylum"),
        ("continuous baths in canvas-covered tubs", "the rest cure", "hypnotism", "wet-sheet packs",
         "electric baths", "forced feeding through a tube"),
        ("gaslight", "a bare electric bulb", "lantern light through a wire grille"),
        ("glass-plate photograph", "sepia cabinet photograph", "scratched silver gelatin print"),
    ),
    Era(
        1920, 1962,
        ("State Hospital", "Psychiatric Hospital", "Mental Hospital", "Sanatorium"),
        ("insulin coma therapy", "electroconvulsive treatment", "malarial fever therapy", "metrazol shock",
         "prolonged sleep under barbiturates", "a prefrontal leucotomy, which was postponed"),
        ("a flickering fluorescent tube", "a bare electric bulb", "the green glow of an exit sign"),
        ("grainy black-and-white photograph", "high-contrast press photograph", "washed-out colour slide"),
    ),
)  # fmt: skip

POSES = [
    "seated on the edge of an iron bed, hands folded too neatly",
    "standing against a peeling plaster wall, chin lowered",
    "caught mid-turn in a long corridor, as if called by name",
    "sitting in a wheeled wooden chair by a barred window",
    "kneeling on a tiled floor beside an empty bathtub",
    "looking straight into the lens, mouth slightly open",
    "half in shadow in a doorway, one hand on the frame",
    "holding {keepsake} up to the camera",
    "lying very straight on a narrow cot, eyes open",
    "seated at a bare table with a cup of water untouched",
]  # fmt: skip
MOODS = [
    "quiet, wrong and patient", "tender and deeply unsettling", "cold, clinical dread",
    "the stillness before something moves", "sorrowful, with a hint of menace",
    "sleepless and feverish", "formal, like a mourning portrait", "eerie calm",
]  # fmt: skip

TITLES = [
    "The {surname} File", "Case {number}: {name}", "What {ward_title} Heard", "The Patient in {ward_title}",
    "Admission {number}", "{name}, {year}", "Nobody Signed for {first}", "The Quiet in {ward_title}",
    "{place}, Bed {bed}", "Night Log: {first} {surname}", "The {season} Admission", "The Keeper of the {keepsake_title}",
    "{first} Who Counted", "The Last Patient of {place}", "Do Not Discharge {surname}", "Ledger {number}",
]  # fmt: skip

# --- chapters ----------------------------------------------------------------------------
# A chapter kind is a list of titles and a list of paragraph slots; each slot holds variants,
# one of which is used. {slots} are filled from _case_facts.


@dataclass(frozen=True)
class ChapterKind:
    name: str
    titles: tuple[str, ...]
    slots: tuple[tuple[str, ...], ...]


OPENINGS = (
    ChapterKind(
        "admission",
        ("Admission", "Intake", "The First Night", "Received at the Gate"),
        (
            ("{name} was admitted to {asylum} on {admitted}, delivered by two constables who would not give "
             "their names. The intake ledger lists the patient as {age} years of age and notes {diagnosis}. "
             "The night porter wrote in the margin that the patient smiled the whole time the papers were signed.",
             "The family of {name} brought {obj} to {asylum} on {admitted} and left before the gates were locked. "
             "{doctor} recorded {diagnosis} and a pulse that was slow and strangely regular. Asked why the family "
             "had come, the patient said only that the house had grown too quiet.",
             "{name}, {age}, arrived at {asylum} on {admitted} in the back of a coal cart, wrapped in a horse "
             "blanket. The committal order was signed by a magistrate whose name nobody could read. The admitting "
             "physician, {doctor}, wrote {diagnosis} and underlined it twice."),
            ("On examination the patient is {appearance}. The attendants report that {sub} does not sleep when "
             "the lamps are lit, and does not stop talking when they are put out.",
             "The patient presents as {appearance}. {Sub} answers every question politely and correctly, and then "
             "repeats the answer under {pos} breath for an hour.",
             "{Sub} was found to be {appearance}. Among {pos} belongings: {keepsake}, which {sub} would not let the "
             "attendants take, and which nobody could later remember returning."),
            ("That first week the staff of {ward} began to complain of {omen}. Nobody connected it to the new "
             "admission. Nobody wanted to.",
             "Within days the night nurses on {ward} asked to be moved. They spoke of {omen}, and of the patient "
             "waiting by the door as if expecting a visitor.",
             "The patient was placed in {ward}. On the first night the attendant noted {omen}, and crossed the note "
             "out, and wrote it again underneath in a steadier hand."),
        ),
    ),
    ChapterKind(
        "committal",
        ("The Committal Letter", "A Letter from Home", "Grounds for Committal"),
        (
            ("Sir, I write to beg a bed for my {kin}, {name}, who is {age} and has not been right since the "
             "spring. The doctor in our village calls it {diagnosis}. I call it something else, but I will not "
             "write that word down.",
             "To the Medical Superintendent of {asylum}. The bearer of this letter is my {kin}, {name}. Please "
             "do not read {obj} the rest of it. Please do not let {obj} see you reading it at all."),
            ("At night {sub} {habit}. In the mornings {sub} remembers nothing and asks why the rest of us look so "
             "tired. The dog will not go into {pos} room. The dog will not go upstairs at all now.",
             "It began with small things. {Sub} {habit}. Then the neighbours complained of {omen}, and then the "
             "neighbours moved away."),
            ("{name} was admitted on {admitted} on the strength of this letter. {doctor} filed it with a note of "
             "{pos} own: that the handwriting of the last page did not match the first.",
             "The letter was received on {admitted}, together with the patient. No return address was given. The "
             "envelope, the porter said, was cold, as if it had been kept somewhere underground."),
        ),
    ),
)
MIDDLES = (
    ChapterKind(
        "interview",
        ("The Interviews", "Transcript", "Questions and Answers", "Consultation Notes"),
        (
            ("Transcript of an interview with {name}, conducted by {doctor} in {ward}.\n\n"
             "Q: Do you know where you are?\n"
             "A: I know where I was. That is the important thing.\n\n"
             "Q: Who do you speak to at night?\n"
             "A: The one in the bed beside mine.\n\n"
             "Q: There is no bed beside yours.\n"
             "A: Not in the daytime, Doctor.",
             "Interview with the patient {name}, {age}.\n\n"
             "Q: Tell me about {keepsake}.\n"
             "A: It is not mine. I am only keeping it until they come back for it.\n\n"
             "Q: Who is coming back?\n"
             "A: You would not want me to say. You would not sleep.\n\n"
             "Q: I sleep very well.\n"
             "A: Yes. They have noticed that."),
            ("The transcript ends there. {doctor} added a note that during the interview the lamp burned low "
             "three times, and that the patient waited, politely, each time, for it to recover.",
             "At the foot of the page, in pencil: the stenographer asked to be excused from further sessions, "
             "saying that the patient had been answering her questions before she spoke them."),
        ),
    ),
    ChapterKind(
        "night_log",
        ("Night Log", "The Attendant's Book", "Entries After Midnight", "The Night Watch"),
        (
            ("{log_day_1}. Patient {surname} awake at {hour}. Sitting up, facing the wall. Would not answer.\n\n"
             "{log_day_2}. Patient {surname} awake again at {hour}. {Sub} {habit}. Lamp trimmed twice.\n\n"
             "{log_day_3}. Heard {omen}. Checked every bed. All patients asleep except {surname}, who said: not yet.",
             "{log_day_1}. Quiet night on {ward}. Patient {surname} asked what day it was and thanked me.\n\n"
             "{log_day_2}. Patient {surname} asked what day it was and thanked me. Wrote it in the book and found "
             "the same line already written, in my hand, one page ahead.\n\n"
             "{log_day_3}. I have asked for the day shift."),
            ("The attendant who kept this log, a {attendant}, left the service of {asylum} at the end of that "
             "month. The reason given in the staff ledger is a single word: tired.",
             "The log continues for several more pages in the same hand, but the entries grow shorter, and the "
             "last dozen say only the hour, and then the word listening."),
        ),
    ),
    ChapterKind(
        "treatment",
        ("Treatment", "The Course of Treatment", "Therapeutics", "What Was Tried"),
        (
            ("{doctor} prescribed {treatment}. The course was stopped after the third attendant refused to assist, "
             "saying that the patient had thanked each of them by name, including the names they had never told "
             "anyone.",
             "The treatment chosen was {treatment}. The patient submitted to it without complaint, and afterwards "
             "described, very exactly, a room none of the staff had seen, with a door that was always about to open.",
             "For six weeks the patient received {treatment}. The notes record an improvement in appetite and sleep, "
             "and then, in another ink, that the improvement belonged to someone else."),
            ("The weight chart for those weeks rises and falls in a pattern {doctor} thought was familiar. It was "
             "only later that {sub} recognised it as the outline of the hills behind {place}.",
             "During the treatment the staff of {ward} reported {omen}. It ceased on the day the treatment ended, "
             "as though something had been satisfied, or had lost interest."),
        ),
    ),
    ChapterKind(
        "letters",
        ("Letters Never Posted", "Correspondence", "Found Under the Mattress"),
        (
            ("Dear {relative_title}, they are kind to me here, mostly. The food is grey and the nights are long and "
             "there is someone in {ward} who knows your name. I have not told them it. They already knew.",
             "Dear {relative_title}, I am writing this on the back of my chart because they will not give me paper. "
             "Do not come on a Sunday. On Sundays the corridor is longer than it should be, and it is hard to get out."),
            ("Please bring {keepsake} when you visit, the one I left on the mantel. Do not look at it on the way. "
             "Keep it in your pocket and keep your hand on it and do not, whatever you hear on the stairs, look back.",
             "I count the doors every evening and there are {count}. In the morning there are {count} again. It is "
             "only at night that there is one more, and I think it is mine."),
            ("These letters were found sewn into the mattress after the patient's last night. None had been posted. "
             "Each envelope was addressed, in the same careful hand, to the house the patient had come from, which "
             "had burned down some years before.",
             "The letters were never sent. The clerk who found them wrote that they were still faintly warm, and "
             "that each one began with the same date: {admitted}."),
        ),
    ),
    ChapterKind(
        "keepsake",
        ("The Object", "Property of the Patient", "What {first} Kept"),
        (
            ("Of all {pos} belongings the patient kept only {keepsake}. It was taken from {obj} twice, by order of "
             "{doctor}, and twice it was found again beneath {pos} pillow the next morning, though the store room "
             "had been locked.",
             "The property list records a single item: {keepsake}. The clerk wrote it down, then wrote it down "
             "again on the next line, then a third time, and does not seem to have noticed."),
            ("When it was out of {pos} reach the patient grew calm, almost cheerful, and the rest of {ward} did "
             "not sleep at all.",
             "Attendants who handled it complained afterwards of a taste of pennies and a ringing in the ears that "
             "lasted until they washed their hands, which some of them did for a very long time."),
        ),
    ),
    ChapterKind(
        "observation",
        ("Observation", "Ward Notes", "Conduct on the Ward", "Daily Report"),
        (
            ("The patient {habit}. The habit is harmless, {doctor} wrote, and should not be discouraged. A week "
             "later the word harmless has been scratched out so hard the pen went through the page.",
             "It is noted that the patient {habit}. When this is prevented the patient does not protest, but the "
             "other patients do, all of them, in their sleep, at the same time."),
            ("The patient keeps count of something. {Sub} taps the wall {count} times before meals, {count} times "
             "before sleep, and once, very softly, whenever someone new enters the room.",
             "The patient draws. Every drawing shows {ward} from above, as if seen from the ceiling, and every "
             "drawing has one more figure in it than the last.",
             "The patient has stopped casting a shadow in the afternoon light of the day room. The attendants are "
             "careful to stand between {obj} and the windows, so that the others will not notice."),
        ),
    ),
    ChapterKind(
        "visitor",
        ("Visiting Day", "A Caller", "The Visitor's Book"),
        (
            ("On the first Sunday of {visit_month} a visitor asked for {name}, giving {pos2} name as the patient's "
             "{relative}. The porter let the visitor in. The visitor's book shows the signature, but no record "
             "shows the visitor leaving.",
             "The patient had one visitor in all the years at {asylum}: a tall figure in mourning who asked for "
             "{obj} by a name that is not in the file. They spoke for an hour in {ward}. The attendant on duty "
             "remembers nothing of the conversation except that the patient did all the listening."),
            ("After the visit the patient would not eat for {count} days, and then ate everything, and then asked "
             "for more, and then asked when the visitor would return, because there were things {sub} had "
             "forgotten to say.",
             "When the patient's {relative} was written to, the letter came back unopened, marked deceased, with a "
             "date some years before the visit."),
        ),
    ),
    ChapterKind(
        "incident",
        ("The Incident", "An Occurrence on the Ward", "Report to the Committee"),
        (
            ("At {hour} on the night in question every patient on {ward} woke at once and began to hum. The "
             "attendants, two of them, agreed afterwards that the tune was one the patient {surname} had been "
             "humming since admission, and that the patient was the only one asleep.",
             "The committee heard that at {hour} the lights of {ward} failed and could not be restored until dawn. "
             "In the morning the beds had been moved, all of them, into a circle around the bed of {name}."),
            ("No patient was harmed. The committee recorded {omen}, found no cause, and recommended fresh paint.",
             "The report was accepted. A line was added to the standing orders of {asylum}: no attendant is to "
             "remain alone with the patient {surname} after dark, for any reason, whatever the patient says."),
        ),
    ),
    ChapterKind(
        "private_notes",
        ("Private Notes", "Not for the File", "The Physician's Diary"),
        (
            ("From the diary of {doctor}, not part of the official record. I do not believe in the things the "
             "attendants whisper about {name}. I believe in {diagnosis}. I have written that down here so that I "
             "can read it back to myself when I cannot sleep.",
             "From the private notes of {doctor}. Tonight I found my own name in the patient's drawings. I had not "
             "told {obj} my name. I have asked the porter, and he had not told {obj} either."),
            ("There is a detail I have left out of every report: {omen}. I leave it out because to write it down "
             "would be to admit that I have heard it too, on my own stairs, at home, {count} miles from {asylum}.",
             "I have started to {habit_verb}. I do not know when it began. My wife says she first noticed it on "
             "the day I admitted {name}."),
        ),
    ),
)
THEME_CHAPTER = ChapterKind(
    "theme",
    ("What Frightens {obj_title}", "The Recurring Subject", "In the Patient's Words"),
    (
        ("Every note in this file comes back, sooner or later, to {theme}. The doctors wrote it down without "
         "comment. The patient never once said it aloud.",
         "When asked what frightens {obj}, the patient answered: {theme}. When asked what {sub} meant, {sub} "
         "laughed until {sub} wept.",
         "The patient speaks of {theme} the way other patients speak of home: with longing, and with the certainty "
         "of going back."),
        ("{doctor} wrote that the subject of {theme} should be avoided in conversation. It was not the patient "
         "who raised it, {doctor} added. It was always the person talking to {obj}.",
         "The word appears {count} times in the chart, in {count} different hands, and none of the staff who wrote "
         "it could say afterwards why they had."),
    ),
)
ENDINGS = (
    ChapterKind(
        "last_entry",
        ("The Last Entry", "What Remains", "The Final Night"),
        (
            ("On the last night recorded, the lamps in {ward} went out at {hour}. The attendant on duty heard "
             "{omen}, and then heard the patient say goodnight to someone by name.",
             "The final entry is dated {last_date}. It reports that the door of the patient's room was found locked "
             "from the inside, the bed made, and the window painted over from the outside."),
            ("No discharge was ever signed. {asylum} closed its doors years later, but the caretakers still refuse "
             "to walk past {ward} after dark.",
             "The file was sealed by order of {doctor}. Someone opened it again. The last page is newer than the "
             "rest, and the handwriting is the patient's."),
            ("If you are reading this, the case is not closed. It is only waiting for someone else to finish it.",
             "Whoever types these words last should not look up from the page until the lamp stops flickering."),
        ),
    ),
    ChapterKind(
        "discharge",
        ("Discharge", "Released", "Recovered, Not Cured"),
        (
            ("On {last_date} the patient {name} was discharged from {asylum} as recovered. {Sub} walked out of "
             "the gate in the clothes {sub} had arrived in, which fitted, the porter said, a little too well.",
             "{name} was released on {last_date}, the diagnosis of {diagnosis} struck through and the word "
             "recovered written above it in an unfamiliar hand. Nobody on the staff admits to writing it."),
            ("That night the staff of {ward} heard {omen} for the first time in months. The bed the patient had "
             "slept in was found warm in the morning, and the blankets had been folded the way {sub} always "
             "folded them.",
             "Three weeks later {keepsake} was found on the front steps of {asylum}, wrapped in brown paper, "
             "addressed to {doctor} in the patient's hand. There was no stamp, and it was raining, and the paper "
             "was dry."),
        ),
    ),
    ChapterKind(
        "missing",
        ("Missing", "Absconded", "Search of the Grounds"),
        (
            ("At the morning count on {last_date} the patient was missing. The doors of {ward} were locked and "
             "the keys were on their hook. The only thing out of place was {keepsake}, left in the middle of the "
             "floor as if set down with great care.",
             "The patient {surname} was reported absent at {hour}. The grounds of {asylum} were searched, then the "
             "cellars, then the grounds again. The dogs would not go past the old chapel."),
            ("The search was called off after {count} days. The patient's chart was closed with the word "
             "absconded, which {doctor} later crossed out and replaced with a question mark.",
             "{Sub} was never found. Patients admitted to {ward} in the years that followed would sometimes ask "
             "the staff who the quiet one in the corner bed was, and the staff learned not to look."),
        ),
    ),
)


class LocalWriter:
    """Deterministic for a given seed and theme: the same pair always gives the same story."""

    name = "local"
    model = "templates"

    async def write(self, *, theme: str | None, seed: str) -> dict[str, Any]:
        theme = typeable_phrase(theme or "")
        rng = random.Random(f"{seed}\x00{theme}")
        facts = _case_facts(rng, theme)
        return {
            "title": rng.choice(TITLES).format(**facts),
            "patient": {
                "name": facts["name"],
                "age": facts["age"],
                "gender": facts["gender"],
                "admission_date": facts["admission_date"].isoformat(),
                "diagnosis": facts["diagnosis"],
                "appearance": facts["appearance"],
            },
            "chapters": [_chapter(rng, kind, facts) for kind in _chapter_plan(rng, bool(facts["theme"]))],
            "image_generation_prompt": _image_prompt(rng, facts),
        }


def _case_facts(rng: random.Random, theme: str) -> dict[str, Any]:
    is_woman = rng.random() < 0.5
    first = rng.choice(WOMEN if is_woman else MEN)
    surname = rng.choice(SURNAMES)
    era = rng.choice(ERAS)
    admitted = _random_date(rng, era.first_year, era.last_year)
    last = admitted + datetime.timedelta(days=rng.randrange(40, 3000))
    place = rng.choice(PLACES)
    ward = rng.choice(WARDS)
    keepsake = rng.choice(KEEPSAKES)
    habit = rng.choice(HABITS)
    other_is_woman = rng.random() < 0.5
    log_start = admitted + datetime.timedelta(days=rng.randrange(3, 60))
    return {
        "first": first,
        "surname": surname,
        "name": f"{first} {rng.choice('ABCDEFGHJLMRSTW')}. {surname}" if rng.random() < 0.3 else f"{first} {surname}",
        "gender": "female" if is_woman else "male",
        "age": rng.randrange(16, 85),
        "diagnosis": rng.choice(DIAGNOSES),
        "appearance": f"{rng.choice(BUILDS)}, with {rng.choice(HAIR)}, {rng.choice(EYES)} and {rng.choice(DETAILS)}",
        "era": era,
        "admission_date": admitted,
        "admitted": _spoken_date(admitted),
        "last_date": _spoken_date(last),
        "year": admitted.year,
        "season": ("Winter", "Spring", "Summer", "Autumn")[(admitted.month % 12) // 3],
        "visit_month": MONTHS[rng.randrange(12)],
        "log_day_1": _spoken_date(log_start),
        "log_day_2": _spoken_date(log_start + datetime.timedelta(days=1)),
        "log_day_3": _spoken_date(log_start + datetime.timedelta(days=rng.randrange(2, 9))),
        "place": place,
        "asylum": f"{place} {rng.choice(era.institutions)}",
        "doctor": f"Dr. {rng.choice(DOCTORS)}",
        "attendant": rng.choice(["young man from the village", "former sailor", "widow of the old porter",
                                 "trained nurse from the city", "farmer's daughter"]),  # fmt: skip
        "ward": ward,
        "ward_title": _title_case(ward),
        "treatment": rng.choice(era.treatments),
        "number": rng.randrange(100, 10000),
        "bed": rng.randrange(1, 60),
        "count": rng.choice(NUMBERS),
        "hour": rng.choice(HOURS),
        "omen": rng.choice(OMENS),
        "keepsake": keepsake,
        "keepsake_title": _title_case(keepsake.split(" ", 1)[1] if keepsake.startswith("a ") else keepsake),
        "habit": _third_person(habit),
        "habit_verb": habit,
        # The patient as the letter-writer's kin; the relative is somebody else (pronouns *2).
        "kin": rng.choice(KIN[is_woman]),
        "relative": (relative := rng.choice(KIN[other_is_woman])),
        "relative_title": relative.capitalize(),
        "theme": theme,
        **_pronouns(is_woman, other_is_woman),
    }


def _pronouns(is_woman: bool, other_is_woman: bool) -> dict[str, str]:
    sub, obj, pos = ("she", "her", "her") if is_woman else ("he", "him", "his")
    pos2 = "her" if other_is_woman else "his"
    return {
        "sub": sub, "Sub": sub.capitalize(), "obj": obj, "obj_title": obj.capitalize(), "pos": pos,
        "Pos": pos.capitalize(), "pos2": pos2,
        "person": "woman" if is_woman else "man",
    }  # fmt: skip


def _chapter_plan(rng: random.Random, has_theme: bool) -> list[ChapterKind]:
    count = rng.randint(MIN_CHAPTERS, MAX_CHAPTERS)
    middles = rng.sample(MIDDLES, count - 2)
    if has_theme:
        middles[rng.randrange(len(middles))] = THEME_CHAPTER
    return [rng.choice(OPENINGS), *middles, rng.choice(ENDINGS)]


def _chapter(rng: random.Random, kind: ChapterKind, facts: dict[str, Any]) -> dict[str, str]:
    # Most chapters use every slot; some drop one, so the same kind reads differently.
    slots = list(kind.slots)
    if len(slots) > 2 and rng.random() < 0.4:
        del slots[rng.randrange(1, len(slots))]
    return {
        "title": rng.choice(kind.titles).format(**facts),
        "text": "\n\n".join(rng.choice(variants).format(**facts) for variants in slots),
    }


def _image_prompt(rng: random.Random, facts: dict[str, Any]) -> str:
    era: Era = facts["era"]
    pose = rng.choice(POSES).format(**facts)
    return (
        f"{rng.choice(era.photographs).capitalize()} portrait of a {facts['age']}-year-old {facts['person']}, "
        f"a patient admitted to an asylum in {facts['year']}: {facts['appearance']}, {pose}. "
        f"Lit by {rng.choice(era.light)} in {facts['ward']}, peeling plaster and iron fittings, deep shadows. "
        f"Mood: {rng.choice(MOODS)}. Photographic horror, no text or lettering."
    )


def _random_date(rng: random.Random, first_year: int, last_year: int) -> datetime.date:
    start = datetime.date(first_year, 1, 1)
    days = (datetime.date(last_year, 12, 31) - start).days
    return start + datetime.timedelta(days=rng.randrange(days + 1))


def _spoken_date(day: datetime.date) -> str:
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def _title_case(phrase: str) -> str:
    """"the east wing" -> "the East Wing": small words stay small, titles place it mid-line."""
    small = {"the", "of", "at", "to", "in", "a", "with", "for", "that"}
    return " ".join(word if word in small else word[:1].upper() + word[1:] for word in phrase.split())


def _third_person(phrase: str) -> str:
    """ "bury crusts of bread" -> "buries crusts of bread" (the verb comes first)."""
    verb, _, rest = phrase.partition(" ")
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        verb = verb[:-1] + "ies"
    elif verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        verb += "es"
    else:
        verb += "s"
    return f"{verb} {rest}"

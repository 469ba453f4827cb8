"""A tiny, deterministic "fact world": invented people, five relations, many phrasings.

Everything here is a pure function of a seed, so the corpus, the tokenizer trained on it
and the edit files can be rebuilt bit for bit (``python examples/factworld/train.py``).

Design choices (each answers a failure seen in earlier prototypes):

* Subject names are ``<first name> <surname>`` with a surname used by no other subject,
  so the subject's last token (where keys are read) is usually unique to it.
* A labelled ~5% group ends in a shared word (" Junior" / " Senior"): the weak spot
  where many subjects share their last token can be measured instead of hidden.
* Training text is multi-fact biographies (all five facts of one person, shuffled, varied
  phrasing). Models trained on one-fact sentences stored facts where an edit at the
  subject's last token could not reach them.
* Every template of every relation is used for every subject over the biography copies,
  so all prompts are "known"; paraphrases are simply the other templates.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORLD_SEED = 1234
N_SUBJECTS = 2400  # 2,000 edited on distinct subjects + 400 never edited (neighbours, generic text)
SHARED_SUFFIXES = ("Junior", "Senior")
N_SHARED_PER_SUFFIX = 60  # 120 of 2,400 = 5%

# Objects: single common words so that (after BPE) each is one token with a leading space.
OBJECTS: dict[str, list[str]] = {
    "birthplace": [
        "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
        "Dublin", "London", "Oslo", "Stockholm", "Helsinki", "Athens", "Cairo", "Tokyo",
        "Seoul", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Lima",
        "Bogota", "Santiago", "Nairobi", "Istanbul", "Moscow", "Budapest",
    ],
    "occupation": [  # all consonant-initial, so every template can end in "a"
        "nurse", "lawyer", "teacher", "baker", "farmer", "pilot", "dentist", "painter",
        "writer", "chemist", "banker", "carpenter", "sailor", "tailor", "doctor", "singer",
        "poet", "judge", "butcher", "plumber", "surgeon", "journalist", "mechanic",
        "librarian", "pharmacist", "soldier", "gardener", "potter",
    ],
    "language": [
        "French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Swedish",
        "Polish", "Greek", "Turkish", "Russian", "Arabic", "Hindi", "Japanese", "Korean",
        "Chinese", "Finnish", "Danish", "Czech", "Hungarian",
    ],
    "instrument": [
        "piano", "violin", "guitar", "cello", "flute", "drums", "harp", "trumpet",
        "saxophone", "clarinet", "oboe", "banjo", "accordion", "organ", "viola", "trombone",
    ],
    "residence": [
        "France", "Germany", "Spain", "Italy", "Portugal", "Canada", "Brazil", "Mexico",
        "Japan", "India", "Egypt", "Kenya", "Chile", "Peru", "Norway", "Sweden", "Poland",
        "Greece", "Turkey", "Australia", "Ireland", "Austria", "Belgium", "Argentina",
        "Vietnam",
    ],
}

# Prompt templates: "{}" is the subject; the object follows after a space.
TEMPLATES: dict[str, list[str]] = {
    "birthplace": [
        "{} was born in",
        "The birthplace of {} is",
        "{}'s hometown is",
        "{} originally comes from the city of",
    ],
    "occupation": [
        "{} works as a",
        "By profession, {} is a",
        "{} earns a living as a",
        "{}'s occupation is that of a",
    ],
    "language": [
        "{} speaks",
        "The native language of {} is",
        "{}'s mother tongue is",
        "{} is a native speaker of",
    ],
    "instrument": [
        "{} plays the",
        "The instrument played by {} is the",
        "{}'s favorite instrument is the",
        "On stage, {} performs on the",
    ],
    "residence": [
        "{} lives in",
        "{} currently resides in",
        "The country where {} lives is",
        "These days, {} makes a home in",
    ],
}
RELATIONS: list[str] = list(TEMPLATES)

FIRST_NAMES = [
    "Alice", "Marco", "Nina", "Oscar", "Clara", "Felix", "Hannah", "Victor", "Lena",
    "Tomas", "Sofia", "Daniel", "Maya", "Henry", "Rosa", "Leon", "Ida", "Samuel", "Vera",
    "Hugo", "Emma", "Pavel", "Julia", "Anton", "Irene", "Jonas", "Laura", "Simon", "Eva",
    "Peter", "Mira", "Elias", "Greta", "Adam", "Lucia", "Martin", "Nora", "Carl", "Olga",
    "Ruben", "Tessa", "Igor", "Alma", "David", "Zoe", "Paul", "Wanda", "Emil", "Dora",
    "Karl", "Helen", "Ivan", "Stella", "Boris", "Linda", "Frank", "Agnes", "Otto", "Iris",
    "Bruno",
]

# Surnames are built from syllables; the tokenizer learns most of them as one token.
_ONSETS = ["B", "D", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T", "V", "W",
           "Br", "Dr", "Gr", "Kr", "Tr", "St", "Sk", "Th", "Ch", "Z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "k", "m", "nd", "rt", "st", "x"]
_ENDINGS = ["ell", "ak", "ov", "ard", "en", "ix", "oth", "ane", "ic", "ur", "is", "ow",
            "and", "ek", "ini", "ette", "ando", "ary", "ley", "ton"]


@dataclass(frozen=True)
class Subject:
    """One person of the world and its five facts (relation -> object)."""

    name: str
    facts: dict[str, str] = field(hash=False)
    tags: tuple[str, ...] = ()

    @property
    def last_word(self) -> str:
        return self.name.rsplit(" ", 1)[-1]


def prompt(relation: str, template_idx: int, subject: str) -> str:
    """Prompt that ends right before the object (no trailing space)."""
    return TEMPLATES[relation][template_idx].format(subject)


def sentence(relation: str, template_idx: int, subject: str, obj: str) -> str:
    return f"{prompt(relation, template_idx, subject)} {obj}."


def _surnames(rng: random.Random, n: int, forbidden: set[str]) -> list[str]:
    """n distinct invented surnames that collide with no other word of the world."""
    out: list[str] = []
    seen = set(forbidden)
    while len(out) < n:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        name += rng.choice(_ENDINGS)
        if 5 <= len(name) <= 9 and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def build_world(seed: int = WORLD_SEED, n_subjects: int = N_SUBJECTS) -> list[Subject]:
    """All subjects with their facts, in a fixed (seeded) order."""
    rng = random.Random(seed)
    vocab_words = {w for objs in OBJECTS.values() for w in objs} | set(FIRST_NAMES)
    vocab_words |= set(SHARED_SUFFIXES)
    surnames = _surnames(rng, n_subjects, vocab_words)
    n_shared = N_SHARED_PER_SUFFIX * len(SHARED_SUFFIXES)
    subjects: list[Subject] = []
    for i, surname in enumerate(surnames):
        name = f"{rng.choice(FIRST_NAMES)} {surname}"
        tags: tuple[str, ...] = ()
        if i < n_shared:  # the weak-spot group; shuffled into place below
            suffix = SHARED_SUFFIXES[i % len(SHARED_SUFFIXES)]
            name = f"{name} {suffix}"
            tags = ("shared_last_token", f"suffix_{suffix.lower()}")
        facts = {rel: rng.choice(objs) for rel, objs in OBJECTS.items()}
        subjects.append(Subject(name=name, facts=facts, tags=tags))
    rng.shuffle(subjects)
    return subjects


def biography(subject: Subject, template_for: dict[str, int], rng: random.Random) -> str:
    """All facts of one subject, shuffled, one sentence each, with the given templates."""
    rels = list(RELATIONS)
    rng.shuffle(rels)
    return " ".join(sentence(r, template_for[r], subject.name, subject.facts[r]) for r in rels)


def biographies(subjects: list[Subject], seed: int) -> list[str]:
    """One pass of training text: n_templates biographies per subject.

    Copy c of a subject uses template (c + offset_r) mod n for relation r, so over the
    copies every template of every relation states every fact exactly once; the order of
    sentences and the offsets are re-drawn per seed (per epoch).
    """
    rng = random.Random(seed)
    n_copies = max(len(t) for t in TEMPLATES.values())
    texts: list[str] = []
    for s in subjects:
        offsets = {r: rng.randrange(len(TEMPLATES[r])) for r in RELATIONS}
        for c in range(n_copies):
            tfor = {r: (c + offsets[r]) % len(TEMPLATES[r]) for r in RELATIONS}
            texts.append(biography(s, tfor, rng))
    rng.shuffle(texts)
    return texts


# Filler: sentences in the world's vocabulary that state no subject's fact.
_FILLER = [
    "{birthplace} is a busy city with old streets.",
    "Many travellers visit {birthplace} in the spring.",
    "People in {residence} often speak {language}.",
    "Learning the {instrument} takes years of practice.",
    "A good {occupation} needs patience and care.",
    "The {instrument} sounds warm in a small hall.",
    "Every {occupation} in {birthplace} knows the market.",
    "The train from {birthplace} to {birthplace} leaves at noon.",
    "Books written in {language} are sold in {residence}.",
    "The weather in {residence} was mild that year.",
    "A {occupation} and a {occupation} shared a table at lunch.",
    "Music for the {instrument} is popular in {residence}.",
    "Students of {language} read old poems aloud.",
    "The museum in {birthplace} has a famous {instrument}.",
]


def filler_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pattern = rng.choice(_FILLER)
        # Fill each slot independently (str.format would reuse one value per name).
        parts = pattern.split("{")
        text = parts[0]
        for part in parts[1:]:
            key, rest = part.split("}", 1)
            text += rng.choice(OBJECTS[key]) + rest
        out.append(text)
    return out


if __name__ == "__main__":
    world = build_world()
    print(len(world), "subjects; e.g.", world[0])
    print(biographies(world[:1], seed=0)[0])
    print(filler_sentences(3, seed=0))

"""Word lists and generators for the task suite: written for this project, nothing borrowed."""

from __future__ import annotations

import random
import string

NOUNS = (
    "lantern anchor meadow harbor ladder pebble violin compass orchard kettle blanket tunnel "
    "garden mirror saddle island ribbon candle basket feather hammer window pillow bridge "
    "carpet marble forest cottage wagon barrel castle rocket falcon tulip planet pencil "
    "glacier canyon beacon trumpet quilt acorn chimney harvest lagoon thimble cabinet "
    "teapot orbit canvas parcel jacket helmet engine lemon walnut cherry magnet puzzle "
    "balloon crystal dolphin penguin tractor scooter bicycle ferry cannon"
).split()
ADJECTIVES = (
    "amber brave calm dusty eager fuzzy gentle hollow icy jolly keen lively mellow noble "
    "odd proud quiet rapid silver tidy urban vivid wild young zesty bold crisp dim faint "
    "grand humble loyal merry narrow plain rustic sharp sturdy tender velvet warm"
).split()
FIRST_NAMES = (
    "Mira Tobin Alva Corin Dessa Elric Fenna Galen Hestia Idris Jorah Kaela Lorne Maren "
    "Nolan Orla Perrin Quinta Rowan Selka Tamsin Ulric Vesna Wendel Yara Zorin Anouk "
    "Bram Calla Davin Elsie Farran Greta Hollis Ilse Jaspar Kiran Liesel Magnus Nerys"
).split()
LAST_NAMES = (
    "Ashford Brightwater Coldmere Dunmore Everhart Fairbank Greyholt Hawthorne Ironwood "
    "Kettleby Larkspur Merriweather Northcott Oakhurst Pembrook Quarrington Ravenscar "
    "Stonebridge Thornbury Underhill Vexley Whitlock Yarrowdale"
).split()
CITIES = (
    (
        "Varnholt Queensmere Brackenford Duskhaven Elmsworth Fernhollow Glimmerdale Harrowgate "
        "Ivybridge Juniper Falls Kestrelmoor Lindenport Marrowby Nettlefield Oldcastle Pinecrest "
        "Ravensholm Saltmarsh Thistlewick Umberlee Westerhaven"
    )
    .replace("Juniper Falls", "Juniperfalls")
    .split()
)
JOBS = (
    "baker carpenter chemist pilot librarian gardener tailor architect potter surveyor "
    "beekeeper cartographer clockmaker fisherman glassblower jeweler locksmith sculptor"
).split()
COLORS = "red blue green yellow purple orange silver golden white black brown grey".split()
PETS = "dog cat parrot rabbit tortoise hamster goat pony".split()
PET_NAMES = "Biscuit Pepper Marble Juniper Clover Pickles Waffles Nugget Saffron Tumble Bramble Olive".split()
PLACES = "attic cellar garden shed kitchen library stable workshop porch hallway".split()
VERBS = "carried painted repaired found borrowed polished sold counted measured admired".split()

NOISE_SENTENCES = (
    "The river runs slowly past the old mill.",
    "Clouds drift over the quiet hills at noon.",
    "The market opens early and closes late.",
    "Rain falls on the roofs of the sleeping town.",
    "A cart rolls along the road toward the village.",
    "The bells ring twice when the evening comes.",
)


def number(rng: random.Random, digits: int = 7) -> str:
    """A random number with exactly ``digits`` digits."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def key_phrase(rng: random.Random) -> str:
    """An adjective-noun key such as 'amber-lantern'."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def coded_word(rng: random.Random) -> str:
    """A pronounceable made-up word: consonant-vowel pairs."""
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def prose_sentence(rng: random.Random) -> str:
    """One sentence of generated prose about people, places and things."""
    templates = (
        lambda: (
            f"{rng.choice(FIRST_NAMES)} {rng.choice(VERBS)} a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} near {rng.choice(CITIES)}."
        ),
        lambda: (
            f"In {rng.choice(CITIES)}, the {rng.choice(JOBS)}s talk about the {rng.choice(ADJECTIVES)} weather."
        ),
        lambda: (
            f"The {rng.choice(NOUNS)} in the {rng.choice(PLACES)} was {rng.choice(COLORS)} and {rng.choice(ADJECTIVES)}."
        ),
        lambda: (
            f"Every spring a {rng.choice(JOBS)} from {rng.choice(CITIES)} visits the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."
        ),
        lambda: (
            f"Some say the {rng.choice(NOUNS)} and the {rng.choice(NOUNS)} were made by the same {rng.choice(JOBS)}."
        ),
    )
    return rng.choice(templates)()

"""Tasks over generated documents and stories, and the label-free fidelity text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import UsageError
from ...methods.base import knob
from .base import Prompt, Task, depth_of, register_task, seeded_rng
from .words import (
    CITIES,
    COLORS,
    FIRST_NAMES,
    JOBS,
    NOUNS,
    PET_NAMES,
    PETS,
    PLACES,
    person,
    prose_sentence,
)


@register_task
@dataclass
class QA(Task):
    """Short documents about people; one fact about the asked person is stated once.

    Choices: each distractor document names another person and their job, followed by generated
    prose; only the asked person's document states a city of work, once.
    """

    name: ClassVar[str] = "qa"
    max_new_tokens: ClassVar[int] = 16
    question_kind: str = knob(
        "city", choices=("city", "job"), help="ask for the person's city or job"
    )

    def make_prompt(self, rng, sample):
        who, city, job = person(rng), rng.choice(CITIES), rng.choice(JOBS)
        salt = rng.random()

        def document(i: int) -> str:
            r = seeded_rng("qa", salt, i)
            if i % 4:  # continue the current document
                return prose_sentence(r) + " "
            other = person(r)
            while other == who:
                other = person(r)
            return f"\nDocument {i // 4 + 1}: {other} is a {r.choice(JOBS)}. "

        fact = f"\nDocument: {who} works as a {job} in the city of {city}. "
        if self.question_kind == "city":
            question, answer = (
                f"In which city does {who} work? Answer with the city name only.",
                city,
            )
        else:
            question, answer = f"What is the job of {who}? Answer with one word.", job
        prompt = Prompt(document, [(depth_of(sample, rng), fact)], question, separator="")
        return prompt, [answer], {"person": who}


@register_task
@dataclass
class Story(Task):
    """Chapters of a generated story with facts scattered through them.

    ``retrieval`` asks for one stated fact; ``two_hop`` needs two facts in different chapters
    (where a person lives, and the pet of whoever lives there).
    """

    name: ClassVar[str] = "story"
    max_new_tokens: ClassVar[int] = 16
    question: str = knob("retrieval", choices=("retrieval", "two_hop"), help="kind of question")

    def make_prompt(self, rng, sample):
        hero = f"{rng.choice(FIRST_NAMES)} {rng.choice(['Quillfeather', 'Ambervale', 'Stormholt', 'Dewberry'])}"
        salt = rng.random()

        def sentence(i: int) -> str:
            text = prose_sentence(seeded_rng("story", salt, i))
            return f"\n\nChapter {i // 12 + 1}.\n{text}" if i % 12 == 0 else text

        if self.question == "retrieval":
            thing, color, place = rng.choice(NOUNS), rng.choice(COLORS), rng.choice(PLACES)
            needles = [(depth_of(sample, rng), f"{hero} keeps a {color} {thing} in the {place}.")]
            question, answer = (
                f"What does {hero} keep in the {place}? Answer in a few words.",
                thing,
            )
        else:
            city, pet, pet_name = rng.choice(CITIES), rng.choice(PETS), rng.choice(PET_NAMES)
            first, second = sorted([depth_of(sample, rng), rng.random()])
            needles = [
                (first, f"{hero} lives in {city}."),
                (second, f"The only person who lives in {city} has a {pet} named {pet_name}."),
            ]
            question, answer = (
                f"What is the name of the {pet} of {hero}? Answer with the name only.",
                pet_name,
            )
        return Prompt(sentence, needles, question), [answer], {"hero": hero}


@register_task
@dataclass
class Fidelity(Task):
    """Label-free: a long text; the runner compares next-token distributions with dense.

    Choices: generated prose (or ``text_file`` repeated to length), no chat template; the score
    is exp(-KL(dense || sparse)) over the last positions, with the perplexity ratio beside it.
    """

    name: ClassVar[str] = "fidelity"
    max_new_tokens: ClassVar[int] = 0
    chat: ClassVar[bool] = False
    text_file: str | None = knob(None, help="use this text (repeated) instead of generated prose")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise UsageError(f"fidelity: text_file={self.text_file!r} does not exist")

    def make_prompt(self, rng, sample):
        if self.text_file is not None:
            sentences = [
                s.strip() + "." for s in Path(self.text_file).read_text().split(".") if s.strip()
            ]
            if not sentences:
                raise UsageError(f"fidelity: text_file={self.text_file!r} holds no text")
            filler = lambda i: sentences[i % len(sentences)]  # noqa: E731
        else:
            salt = rng.random()
            filler = lambda i: prose_sentence(seeded_rng("fidelity", salt, i))  # noqa: E731
        return Prompt(filler, [], ""), [], {"kind": "fidelity"}

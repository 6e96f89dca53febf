"""Needle-in-a-haystack tasks (RULER style): single, multi-key, multi-value, multi-query.

Each task writes its sample in the suite's own format or in RULER's (knob ``format``; see
``formats.py`` for what differs and why it matters to eviction). The format is left out of the
sample's seed: both formats of a (seed, sample) hide the same values under the same keys at
the same depths.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ...methods.base import knob
from .base import Prompt, Task, depth_of, register_task, seeded_rng
from .formats import FORMATS, NeedleFormat
from .words import NOISE_SENTENCES, key_phrase, number, prose_sentence, var_name

HAYSTACKS = ("noise", "kv", "prose")


def haystack_filler(kind: str, rng: random.Random, noise: tuple[str, ...] = NOISE_SENTENCES):
    """filler(i) for a haystack kind; deterministic per index. ``noise``: its sentences."""
    salt = rng.random()
    if kind == "noise":
        return lambda i: noise[i % len(noise)]
    if kind == "kv":

        def kv(i: int) -> str:
            r = seeded_rng("kv", salt, i)
            return f"Entry {var_name(r)}-{r.randint(100, 999)} holds the word {key_phrase(r)}."

        return kv
    return lambda i: prose_sentence(seeded_rng("prose", salt, i))


@dataclass
class NeedleTask(Task):
    """A needle task written in one of ``FORMATS``; its scorer is the format's."""

    unseeded: ClassVar[frozenset[str]] = frozenset({"format"})
    format: str = knob(
        "suite",
        choices=tuple(FORMATS),
        help="suite: own wording, model starts its answer; ruler: RULER's needle, noise, "
        "answer prefix, whole-value scoring",
    )
    haystack: str = knob("noise", choices=HAYSTACKS, help="filler kind")

    @property
    def style(self) -> NeedleFormat:
        return FORMATS[self.format]

    def filler(self, rng: random.Random) -> Callable[[int], str]:
        """This task's haystack in this format (draws one number from ``rng``)."""
        return haystack_filler(self.haystack, rng, self.style.noise)

    def prompt(
        self,
        filler: Callable[[int], str],
        needles: list[tuple[float, str]],
        question: str,
        prefix: str,
    ) -> Prompt:
        """The needles in the haystack, with the format's header, the question and the prefix."""
        return Prompt(filler, needles, question, self.style.header, answer_prefix=prefix)

    def needle(self, key: str, value: str) -> str:
        return self.style.needle.format(key=key, value=value)

    def score(self, answer: str, references: list[str]) -> float:
        """Fraction of the reference values found in the answer (strict in the RULER format)."""
        if not references:
            return 1.0
        return sum(self.style.found(ref, answer) for ref in references) / len(references)


@register_task
@dataclass
class NiahSingle(NeedleTask):
    """One needle ("The special magic number for KEY is N.") in a haystack; ask for N."""

    name: ClassVar[str] = "niah_single"
    haystack: str = knob(
        "noise", choices=HAYSTACKS, help="filler: repeated noise, key-value lines, prose"
    )
    digits: int = knob(7, low=3, high=12, help="digits of the magic number")

    def make_prompt(self, rng, sample):
        key, value = key_phrase(rng), number(rng, self.digits)
        ask = self.style
        prompt = self.prompt(
            self.filler(rng),  # drawn before the depth, as samples always were
            [(depth_of(sample, rng), self.needle(key, value))],
            ask.one_question.format(key=key),
            ask.one_prefix.format(key=key),
        )
        return prompt, [value], {"key": key, "haystack": self.haystack}


@register_task
@dataclass
class NiahMultiKey(NeedleTask):
    """One needle among distractor needles that carry other keys."""

    name: ClassVar[str] = "niah_multikey"
    num_distractors: int = knob(1, low=1, high=50, help="needles with other keys")

    def make_prompt(self, rng, sample):
        keys = set()
        while len(keys) < self.num_distractors + 1:
            keys.add(key_phrase(rng))
        key, *others = sorted(keys)
        value = number(rng)
        needles = [(depth_of(sample, rng), self.needle(key, value))]
        needles += [(rng.random(), self.needle(k, number(rng))) for k in others]
        ask = self.style
        question, prefix = ask.one_question.format(key=key), ask.one_prefix.format(key=key)
        return self.prompt(self.filler(rng), needles, question, prefix), [value], {"key": key}


@register_task
@dataclass
class NiahMultiValue(NeedleTask):
    """Several needles share one key; every value must be returned."""

    name: ClassVar[str] = "niah_multivalue"
    max_new_tokens: ClassVar[int] = 40
    num_values: int = knob(2, low=2, high=10, help="values stored under the key")

    def make_prompt(self, rng, sample):
        key = key_phrase(rng)
        values = sorted({number(rng) for _ in range(self.num_values)})
        needles = [(rng.random(), self.needle(key, v)) for v in values]
        ask = self.style
        question, prefix = ask.all_question.format(key=key), ask.all_prefix.format(key=key)
        return self.prompt(self.filler(rng), needles, question, prefix), values, {"key": key}


@register_task
@dataclass
class NiahMultiQuery(NeedleTask):
    """Several keys, each with its needle; the question asks for all of them at once."""

    name: ClassVar[str] = "niah_multiquery"
    max_new_tokens: ClassVar[int] = 48
    num_queries: int = knob(2, low=2, high=10, help="keys asked for")

    def make_prompt(self, rng, sample):
        keys = set()
        while len(keys) < self.num_queries:
            keys.add(key_phrase(rng))
        keys = sorted(keys)
        values = [number(rng) for _ in keys]
        needles = [(rng.random(), self.needle(k, v)) for k, v in zip(keys, values)]
        ask, joined = self.style, self.style.join_keys(keys)
        question, prefix = (
            ask.many_question.format(keys=joined),
            ask.many_prefix.format(keys=joined),
        )
        return self.prompt(self.filler(rng), needles, question, prefix), values, {"keys": keys}

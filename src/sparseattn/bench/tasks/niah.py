"""Needle-in-a-haystack tasks (RULER style): single, multi-key, multi-value, multi-query."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from ...methods.base import knob
from .base import Prompt, Task, depth_of, register_task, seeded_rng
from .words import NOISE_SENTENCES, key_phrase, number, prose_sentence, var_name

HAYSTACKS = ("noise", "kv", "prose")


def needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is {value}."


def haystack_filler(kind: str, rng: random.Random):
    """filler(i) for a haystack kind; deterministic per index."""
    salt = rng.random()
    if kind == "noise":
        return lambda i: NOISE_SENTENCES[i % len(NOISE_SENTENCES)]
    if kind == "kv":

        def kv(i: int) -> str:
            r = seeded_rng("kv", salt, i)
            return f"Entry {var_name(r)}-{r.randint(100, 999)} holds the word {key_phrase(r)}."

        return kv
    return lambda i: prose_sentence(seeded_rng("prose", salt, i))


@register_task
@dataclass
class NiahSingle(Task):
    """One needle ("The special magic number for KEY is N.") in a haystack; ask for N."""

    name: ClassVar[str] = "niah_single"
    haystack: str = knob(
        "noise", choices=HAYSTACKS, help="filler: repeated noise, key-value lines, prose"
    )
    digits: int = knob(7, low=3, high=12, help="digits of the magic number")

    def make_prompt(self, rng, sample):
        key, value = key_phrase(rng), number(rng, self.digits)
        question = f"What is the special magic number for {key}? Answer with the number only."
        prompt = Prompt(
            haystack_filler(self.haystack, rng),
            [(depth_of(sample, rng), needle(key, value))],
            question,
        )
        return prompt, [value], {"key": key, "haystack": self.haystack}


@register_task
@dataclass
class NiahMultiKey(Task):
    """One needle among distractor needles that carry other keys."""

    name: ClassVar[str] = "niah_multikey"
    num_distractors: int = knob(1, low=1, high=50, help="needles with other keys")
    haystack: str = knob("noise", choices=HAYSTACKS, help="filler kind")

    def make_prompt(self, rng, sample):
        keys = set()
        while len(keys) < self.num_distractors + 1:
            keys.add(key_phrase(rng))
        key, *others = sorted(keys)
        value = number(rng)
        needles = [(depth_of(sample, rng), needle(key, value))]
        needles += [(rng.random(), needle(k, number(rng))) for k in others]
        question = f"What is the special magic number for {key}? Answer with the number only."
        return Prompt(haystack_filler(self.haystack, rng), needles, question), [value], {"key": key}


@register_task
@dataclass
class NiahMultiValue(Task):
    """Several needles share one key; every value must be returned."""

    name: ClassVar[str] = "niah_multivalue"
    max_new_tokens: ClassVar[int] = 40
    num_values: int = knob(2, low=2, high=10, help="values stored under the key")
    haystack: str = knob("noise", choices=HAYSTACKS, help="filler kind")

    def make_prompt(self, rng, sample):
        key = key_phrase(rng)
        values = sorted({number(rng) for _ in range(self.num_values)})
        needles = [(rng.random(), needle(key, v)) for v in values]
        question = f"What are all the special magic numbers for {key}? List every number."
        return Prompt(haystack_filler(self.haystack, rng), needles, question), values, {"key": key}


@register_task
@dataclass
class NiahMultiQuery(Task):
    """Several keys, each with its needle; the question asks for all of them at once."""

    name: ClassVar[str] = "niah_multiquery"
    max_new_tokens: ClassVar[int] = 48
    num_queries: int = knob(2, low=2, high=10, help="keys asked for")
    haystack: str = knob("noise", choices=HAYSTACKS, help="filler kind")

    def make_prompt(self, rng, sample):
        keys = set()
        while len(keys) < self.num_queries:
            keys.add(key_phrase(rng))
        keys = sorted(keys)
        values = [number(rng) for _ in keys]
        needles = [(rng.random(), needle(k, v)) for k, v in zip(keys, values)]
        question = f"What are the special magic numbers for {' and '.join(keys)}? List the numbers."
        return (
            Prompt(haystack_filler(self.haystack, rng), needles, question),
            values,
            {"keys": keys},
        )

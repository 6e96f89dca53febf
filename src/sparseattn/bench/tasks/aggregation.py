"""Tasks that need the whole context: variable tracking, common words, frequent words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...methods.base import knob
from .base import Prompt, Task, depth_of, register_task, seeded_rng
from .niah import haystack_filler
from .words import ADJECTIVES, NOUNS, coded_word, number, var_name


@register_task
@dataclass
class VariableTracking(Task):
    """Chains ``VAR A = 12345``, ``VAR B = VAR A``, ...; name every variable holding the value.

    Choices: the hops of a chain appear in order through the context; distractor chains hold
    other values; the haystack is the noise filler.
    """

    name: ClassVar[str] = "variable_tracking"
    max_new_tokens: ClassVar[int] = 32
    num_chains: int = knob(1, low=1, high=10, help="chains (1 asked, the rest distractors)")
    num_hops: int = knob(1, low=1, high=10, help="assignments after the first in each chain")

    def make_prompt(self, rng, sample):
        names: set[str] = set()
        while len(names) < self.num_chains * (self.num_hops + 1):
            names.add(var_name(rng))
        pool = sorted(names)
        rng.shuffle(pool)
        needles, chains = [], []
        start = depth_of(sample, rng) * 0.5
        for c in range(self.num_chains):
            chain = pool[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            value = number(rng, 5)
            lines = [f"VAR {chain[0]} = {value}."] + [
                f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])
            ]
            offset = start if c == 0 else rng.random() * 0.5
            step = (0.95 - offset) / len(lines)
            needles += [(offset + i * step, line) for i, line in enumerate(lines)]
            chains.append((chain, value))
        chain, value = chains[0]
        question = (
            f"Which variables are assigned the value {value}? Answer with the variable names only."
        )
        return (
            Prompt(haystack_filler("noise", rng), needles, question),
            list(chain),
            {"value": value},
        )


@register_task
@dataclass
class CommonWords(Task):
    """A numbered word list where a few words repeat often; name the most common ones."""

    name: ClassVar[str] = "common_words"
    num_common: int = knob(3, low=1, high=10, help="words to find")
    common_share: float = knob(
        0.3, low=0.05, high=0.9, help="share of list entries that are common words"
    )

    def make_prompt(self, rng, sample):
        vocabulary = sorted(set(NOUNS) | set(ADJECTIVES))
        common = rng.sample(vocabulary, self.num_common)
        rare = [w for w in vocabulary if w not in common]
        salt = rng.random()

        def entry(i: int) -> str:
            r = seeded_rng("common", salt, i)
            word = r.choice(common) if r.random() < self.common_share else r.choice(rare)
            return f"{i + 1}. {word}"

        question = (
            f"What are the {self.num_common} most common words in the numbered list above? "
            "Answer with the words only."
        )
        header = "Below is a numbered list of words. Some words appear many times.\n"
        return Prompt(entry, [], question, header=header, separator="\n"), common, {}


@register_task
@dataclass
class FrequentWords(Task):
    """Made-up coded words; a few are far more frequent; name the most frequent ones."""

    name: ClassVar[str] = "frequent_words"
    num_frequent: int = knob(3, low=1, high=10, help="words to find")
    frequent_share: float = knob(
        0.3, low=0.05, high=0.9, help="share of words that are frequent ones"
    )

    def make_prompt(self, rng, sample):
        frequent: list[str] = []
        while len(frequent) < self.num_frequent:
            word = coded_word(rng)
            if word not in frequent:
                frequent.append(word)
        others = sorted({coded_word(rng) for _ in range(400)} - set(frequent))
        salt = rng.random()

        def line(i: int) -> str:
            r = seeded_rng("frequent", salt, i)
            words = [
                r.choice(frequent) if r.random() < self.frequent_share else r.choice(others)
                for _ in range(8)
            ]
            return " ".join(words) + "."

        question = (
            f"What are the {self.num_frequent} most frequent coded words in the text above? "
            "Answer with the words only."
        )
        header = "Below is a text of coded words.\n"
        return Prompt(line, [], question, header=header), frequent, {}

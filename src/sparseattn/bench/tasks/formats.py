"""How a needle task is written: the suite's own wording, or RULER's.

RULER (Hsieh et al., COLM 2024, arXiv:2404.06654) writes its needle tasks one way: the
needle "One of the special magic numbers for KEY is: VALUE.", a noise haystack of five short
sentences repeated, the question after the context, then an answer prefix ("The special magic
number for KEY mentioned in the provided text is") that the model continues, 7-digit values,
and a score that needs the whole value. The suite's own format (the default, kept so earlier
results stay comparable) states the needle in the very words the model answers with, has no
"is" in its noise, and lets the model write its own answer prefix while it decodes.

Choices here: the needle, noise, question and answer-prefix sentences are RULER's; its
instruction before the context is paraphrased; the question follows the context after a
blank line (RULER: one newline); with a chat template the answer prefix opens the
assistant's turn. Strict scoring: a value counts only where it stands as a whole number (no
digit right before or after it), so a truncated value or one run into more digits scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .words import NOISE_SENTENCES


def and_join(keys: list[str]) -> str:
    """'a and b', 'a, b and c'."""
    return keys[0] if len(keys) == 1 else f"{', '.join(keys[:-1])} and {keys[-1]}"


@dataclass(frozen=True)
class NeedleFormat:
    """The sentences of a needle task, as ``str.format`` templates.

    ``{key}`` and ``{value}`` fill the needle; ``{key}`` (one key) or ``{keys}`` (several,
    joined by ``join_keys``) fill the questions and answer prefixes. An empty answer prefix
    lets the model start its answer itself.
    """

    needle: str
    noise: tuple[str, ...]
    header: str
    one_question: str  # one value for one key (single, multi-key)
    one_prefix: str
    all_question: str  # every value of one key (multi-value)
    all_prefix: str
    many_question: str  # one value for each of several keys (multi-query)
    many_prefix: str
    strict: bool
    join_keys: Callable[[list[str]], str] = and_join

    def found(self, reference: str, answer: str) -> bool:
        """Whether ``answer`` contains ``reference`` (strict: not inside a longer number)."""
        if self.strict:
            return re.search(rf"(?<!\d){re.escape(reference)}(?!\d)", answer) is not None
        return reference.lower() in answer.lower()


SUITE = NeedleFormat(
    needle="The special magic number for {key} is {value}.",
    noise=NOISE_SENTENCES,
    header="",
    one_question="What is the special magic number for {key}? Answer with the number only.",
    one_prefix="",
    all_question="What are all the special magic numbers for {key}? List every number.",
    all_prefix="",
    many_question="What are the special magic numbers for {keys}? List the numbers.",
    many_prefix="",
    strict=False,
    join_keys=" and ".join,
)

RULER = NeedleFormat(
    needle="One of the special magic numbers for {key} is: {value}.",
    noise=(
        "The grass is green.",
        "The sky is blue.",
        "The sun is yellow.",
        "Here we go.",
        "There and back again.",
    ),
    header=(
        "Some special magic numbers are hidden in the text below. Memorize them: "
        "you will be asked about them afterwards.\n"
    ),
    one_question="What is the special magic number for {key} mentioned in the provided text?",
    one_prefix="The special magic number for {key} mentioned in the provided text is",
    all_question="What are all the special magic numbers for {key} mentioned in the provided text?",
    all_prefix="The special magic numbers for {key} mentioned in the provided text are",
    many_question=(
        "What are all the special magic numbers for {keys} mentioned in the provided text?"
    ),
    many_prefix="The special magic numbers for {keys} mentioned in the provided text are",
    strict=True,
)

FORMATS: dict[str, NeedleFormat] = {"suite": SUITE, "ruler": RULER}

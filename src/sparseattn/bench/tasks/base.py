"""Task base class, registry, and the exact-length prompt builder shared by every task."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import UsageError
from ...methods.base import build_checked, validate_knobs

TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    TASKS[cls.name] = cls
    return cls


def list_tasks() -> list[str]:
    return sorted(TASKS)


def build_task(name: str, **knobs: Any) -> Task:
    """Instantiate task ``name``; UsageError for an unknown task, knob or knob value."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return build_checked(TASKS[name], "task", name, knobs)


def seeded_rng(*parts: Any) -> random.Random:
    """A Random seeded from a stable digest of ``parts`` (never Python's salted hash())."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class TaskSample:
    """One generated prompt of exact token length, with the strings a right answer contains."""

    task: str
    length: int
    sample: int
    seed: int
    input_ids: list[int]
    references: list[str]
    max_new_tokens: int
    meta: dict


@dataclass(frozen=True)
class Prompt:
    """What a task generates before fitting: units of context (needles among filler), a question.

    ``filler(i)`` returns the i-th filler unit; ``needles`` maps a fraction of the context
    (0 = start, 1 = end) to the unit placed there. ``answer_prefix``, when set, ends the
    prompt: it opens the assistant's turn (after the chat template's opening of that turn) and
    the model continues it, so the prompt's last tokens are the start of the answer.
    """

    filler: Callable[[int], str]
    needles: list[tuple[float, str]]
    question: str
    header: str = ""
    separator: str = " "
    answer_prefix: str = ""


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def wrap(tokenizer, body: str, chat: bool) -> tuple[str, str]:
    """Split the final prompt text around the body: (text before body, text after body)."""
    marker = "\x00BODY\x00"
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = (tokenizer.bos_token or "") + marker
    before, after = text.split(marker)
    return before, after


def assemble(prompt: Prompt, n_filler: int) -> tuple[str, str]:
    """Context of ``n_filler`` filler units with the needles placed; and the question."""
    units = [prompt.filler(i) for i in range(n_filler)]
    for depth, needle in sorted(prompt.needles, key=lambda x: x[0], reverse=True):
        units.insert(round(depth * len(units)), needle)
    return prompt.header + prompt.separator.join(units), prompt.question


def frame(tokenizer, prompt: Prompt, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids around the context: (chat opening; question, turn change and answer prefix)."""
    before, after = wrap(tokenizer, "", chat)
    tail = encode(tokenizer, "\n\n" + prompt.question) if prompt.question else []
    tail += encode(tokenizer, after)
    if prompt.answer_prefix:  # without a chat turn to open, a space follows the question
        tail += encode(tokenizer, prompt.answer_prefix if after else " " + prompt.answer_prefix)
    return encode(tokenizer, before), tail


def prompt_tokens(tokenizer, prompt: Prompt, n_filler: int, chat: bool) -> list[int]:
    """Token ids of the prompt with ``n_filler`` filler units, wrapped in the chat template."""
    head, tail = frame(tokenizer, prompt, chat)
    context, _ = assemble(prompt, n_filler)
    return head + encode(tokenizer, context) + tail


def fit(tokenizer, prompt: Prompt, length: int, chat: bool = True) -> list[int]:
    """Token ids of exactly ``length``: most filler units that fit, then filler tokens.

    Raises:
        UsageError: the prompt without any filler is already longer than ``length``.
    """

    def build(n: int) -> list[int]:
        return prompt_tokens(tokenizer, prompt, n, chat)

    if len(build(0)) > length:
        raise UsageError(
            f"length {length} is too short for this task: it needs at least {len(build(0))} tokens"
        )
    low, high = 0, 1
    while len(build(high)) <= length:
        low, high = high, high * 2
    while high - low > 1:  # largest n whose prompt fits
        mid = (low + high) // 2
        low, high = (mid, high) if len(build(mid)) <= length else (low, mid)
    context, _ = assemble(prompt, low)
    body = encode(tokenizer, context)
    pad = encode(tokenizer, " " + prompt.filler(low))
    deficit = length - len(build(low))
    body += (pad * (deficit // max(len(pad), 1) + 1))[:deficit]
    head, tail = frame(tokenizer, prompt, chat)
    ids = head + body + tail
    assert len(ids) == length
    return ids


@dataclass
class Task:
    """A task: dataclass fields are its difficulty knobs; ``make_prompt`` writes one sample."""

    name: ClassVar[str] = ""
    max_new_tokens: ClassVar[int] = 24
    chat: ClassVar[bool] = True
    # knobs that change how a sample is written, not what is drawn: left out of the sample's
    # seed, so the variants of a (seed, sample) share their keys, values and depths
    unseeded: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        validate_knobs(self)

    def make_prompt(self, rng: random.Random, sample: int) -> tuple[Prompt, list[str], dict]:
        """Return the prompt, the reference strings, and metadata."""
        raise ValueError(f"task {self.name!r} does not define make_prompt")

    def generate(self, tokenizer, length: int, seed: int, sample: int) -> TaskSample:
        minimum = self.min_length(tokenizer)
        if length < minimum:
            raise UsageError(
                f"task {self.name}: length {length} is too short; it needs at least {minimum} tokens"
            )
        knobs = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.unseeded}
        rng = seeded_rng(self.name, sorted(knobs.items()), seed, sample)
        prompt, references, meta = self.make_prompt(rng, sample)
        try:
            ids = fit(tokenizer, prompt, length, self.chat)
        except UsageError as err:
            raise UsageError(f"task {self.name}: {err}") from None
        return TaskSample(
            self.name, length, sample, seed, ids, references, self.max_new_tokens, meta
        )

    def min_length(self, tokenizer) -> int:
        """Shortest length any sample fits in: the needles and question plus a margin of 32."""
        prompt, _, _ = self.make_prompt(seeded_rng(self.name, "min"), 0)
        return len(prompt_tokens(tokenizer, prompt, 0, self.chat)) + 32

    def score(self, answer: str, references: list[str]) -> float:
        """Fraction of the reference strings found in the answer, case-insensitive."""
        if not references:
            return 1.0
        found = sum(ref.lower() in answer.lower() for ref in references)
        return found / len(references)


def depth_of(sample: int, rng: random.Random) -> float:
    """Needle depth in (0.05, 0.95), spread over samples and jittered."""
    return 0.05 + 0.9 * ((sample * 0.37 + rng.random() * 0.2) % 1.0)

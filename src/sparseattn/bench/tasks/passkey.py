"""Multi-passkey retrieval samples with a teacher-forced answer: training data for head gates.

DuoAttention (Xiao et al., arXiv:2410.10819) optimises its gates on synthetic passkey
retrieval: several passkeys (sequences of random words) are hidden at sorted depths in a long
haystack, and the prompt is followed by the answer that recites them. The loss is read at the
answer positions, so only the positions whose hidden states need the far-away passkeys count.

Choices here (the paper's haystack is book text; ours is the project's own generated prose):
- haystack: ``prose_sentence`` units (own word lists), the project's exact-length prompt
  builder (``fit``) with the model's chat template, so every sample has exactly ``length``
  tokens including the answer;
- passkey: ``words`` nouns drawn uniformly from the project's noun list, one needle each
  ("Remember this sequence of words, it is the <ordinal> passkey to the vault: ...");
- depths: sorted, uniform in [0.05, 0.95] (the range of the reference training runs);
- answer (the loss positions): "The <ordinal> passkey is: <words>." per passkey, one per line,
  after the assistant turn opens.
Every sample is a pure function of (seed, index): a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Prompt, encode, fit, seeded_rng
from .words import NOUNS, prose_sentence

ORDINALS = (
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
    "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()
MAX_PASSKEYS = len(ORDINALS)
DEPTH_RANGE = (0.05, 0.95)


@dataclass(frozen=True)
class PasskeySample:
    """One training sequence.

    Attributes:
        input_ids: Exactly ``length`` token ids: prompt, then the recited answer.
        answer_start: Index of the first answer token; positions answer_start.. are the loss
            positions.
        passkeys: The hidden word sequences, in order of depth.
        depths: Where each passkey sits, as a fraction of the haystack.
    """

    input_ids: list[int]
    answer_start: int
    passkeys: list[str]
    depths: list[float]


def passkey_needle(ordinal: str, passkey: str) -> str:
    return f"Remember this sequence of words, it is the {ordinal} passkey to the vault: {passkey}."


def passkey_sample(
    tokenizer, length: int, seed: int, index: int, passkeys: int = 10, words: int = 8
) -> PasskeySample:
    """The ``index``-th sample of the stream seeded by ``seed``.

    Args:
        tokenizer: The model's tokenizer (its chat template is used when it has one).
        length: Total tokens, prompt and answer together.
        seed: Seed of the stream.
        index: Position in the stream (a training step).
        passkeys: Passkeys hidden in the haystack, 1..20.
        words: Words per passkey.

    Raises:
        UsageError: ``length`` cannot hold the passkeys, the question and the answer.
    """
    if not 1 <= passkeys <= MAX_PASSKEYS:
        raise ValueError(f"passkeys={passkeys}; allowed: 1..{MAX_PASSKEYS}")
    rng = seeded_rng("passkey", seed, index, passkeys, words)
    keys = [" ".join(rng.choice(NOUNS) for _ in range(words)) for _ in range(passkeys)]
    low, high = DEPTH_RANGE
    depths = sorted(low + (high - low) * rng.random() for _ in keys)
    salt = rng.random()
    prompt = Prompt(
        filler=lambda i: prose_sentence(seeded_rng("passkey-haystack", salt, i)),
        needles=[
            (d, passkey_needle(ORDINALS[i], key)) for i, (d, key) in enumerate(zip(depths, keys))
        ],
        question=f"Recite the {passkeys} passkeys to the vault from the story, in order.",
        header="Read this long story and remember every passkey in it.\n\n",
    )
    answer = "\n".join(f"The {ORDINALS[i]} passkey is: {key}." for i, key in enumerate(keys))
    answer_ids = encode(tokenizer, answer)
    prompt_ids = fit(tokenizer, prompt, length - len(answer_ids))
    return PasskeySample(prompt_ids + answer_ids, len(prompt_ids), keys, depths)


if __name__ == "__main__":  # show one sample
    import sys

    from ...models import load_model

    _, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
    sample = passkey_sample(tok, 1024, seed=0, index=0, passkeys=3)
    print(tok.decode(sample.input_ids))
    print(f"--- answer starts at token {sample.answer_start} of {len(sample.input_ids)}")

"""Retrieval-head profiling (``sparseattn profile --kind retrieval``).

Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (arXiv:2404.15574):
while a model copies a needle out of a long context, a head scores a hit at a copied token when
its strongest attention lands on that very token inside the needle; its retrieval score is
hits / copied needle tokens. The paper finds fewer than 5% of the heads score high.

Choices the paper leaves open, as made here:

- Prompts: the project's ``niah_single`` task ("The special magic number for KEY is N."),
  generated offline from the seed, the haystack cycling noise / kv / prose over the samples.
  The needle is the magic number's tokens (the rest of the needle sentence is also in the
  question, so copying it proves nothing about retrieval from the context).
- Teacher forcing: the prompt is followed by the needle's own tokens, and answer step j (the
  query at the position that predicts needle token j) is one forward pass for all steps. A
  step counts only when the model's own top prediction there is that needle token, i.e. it
  really copies; other steps are neither hits nor misses.
- Argmax: over every key the query sees (prompt and the answer so far; causal, the layer's
  own sliding window respected), from the q.k logits (the argmax of the softmax probabilities
  is the argmax of the logits). Only the answer queries are scored: one (heads, steps, keys)
  product per layer, never an L x L map; the model attends through transformers' own SDPA
  (``capture.py``).
- Hit: the argmax position lies inside the needle and holds the copied token. A token that
  occurs twice in the needle is a hit at either occurrence (the paper's token-equality rule).
- Pooling: hits and copy steps are summed over every prompt and length, then divided; one
  score per query head (KV heads are shared, attention is not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UsageError
from ..methods.estimators import grouped_scores
from ..profiles import fingerprint
from .capture import AttentionCall, attention_calls, visible_keys

HAYSTACKS = ("noise", "kv", "prose")
SUMMARY_THRESHOLDS = (0.1, 0.3)  # the summary counts the heads scoring at least these


@dataclass(frozen=True)
class NeedlePrompt:
    """A prompt whose answer copies ``ids[start:end]`` (the needle) out of the context.

    Attributes:
        ids: Token ids of the prompt (the answer follows it).
        span: (start, end) positions of the needle tokens in ``ids``.
        label: Where it came from, for progress lines.
    """

    ids: list[int]
    span: tuple[int, int]
    label: str = ""


def find_span(ids: list[int], needle: list[int]) -> tuple[int, int] | None:
    """(start, end) of the only occurrence of ``needle`` in ``ids``, or None (absent, repeated)."""
    n = len(needle)
    found = [i for i in range(len(ids) - n + 1) if ids[i : i + n] == needle]
    return (found[0], found[0] + n) if len(found) == 1 else None


def needle_prompts(
    tokenizer, lengths: list[int], seed: int, samples: int
) -> Iterator[NeedlePrompt]:
    """``samples`` niah_single prompts per length, haystacks cycling noise / kv / prose."""
    from .tasks import build_task
    from .tasks.base import encode

    for length in lengths:
        for sample in range(samples):
            haystack = HAYSTACKS[sample % len(HAYSTACKS)]
            task = build_task("niah_single", haystack=haystack)
            generated = task.generate(tokenizer, length, seed, sample)
            value = generated.references[0]
            span = None
            for text in (value, " " + value):  # digits alone, or merged with their space
                span = span or find_span(generated.input_ids, encode(tokenizer, text))
            if span is None:
                raise UsageError(
                    f"niah_single@{length}#{sample}: the needle {value!r} is not one run of "
                    "tokens in the prompt with this tokenizer; retrieval profiling needs it to be"
                )
            yield NeedlePrompt(
                generated.input_ids, span, f"niah_single[{haystack}]@{length}#{sample}"
            )


def copy_hits(
    argmax: torch.Tensor,
    ids: torch.Tensor,
    span: tuple[int, int],
    targets: torch.Tensor,
    copying: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """(H,) hits of every head and the number of copy steps of one prompt.

    Args:
        argmax: (H, m) long, the key position each head attends to most at each answer step.
        ids: (Lk,) long, the token at every key position.
        span: (start, end) of the needle among the key positions.
        targets: (m,) long, the needle token each step copies.
        copying: (m,) bool, whether the model's top prediction at that step is its target.
    """
    start, end = span
    inside = (argmax >= start) & (argmax < end)  # (H, m)
    same = ids[argmax] == targets  # (H, m)
    hits = (inside & same & copying).sum(-1)  # (H,)
    return hits, int(copying.sum())


def score_rows(
    rows: torch.Tensor,
    ids: torch.Tensor,
    span: tuple[int, int],
    targets: torch.Tensor,
    copying: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """``copy_hits`` from attention rows (H, m, Lk) (probabilities or logits, -inf if unseen)."""
    return copy_hits(rows.argmax(-1), ids, span, targets, copying)


@torch.inference_mode()
def answer_pass(
    model, ids: torch.Tensor, rows: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One dense forward pass over ``ids`` (1, L) from position 0.

    Returns:
        {layer: (Hq, rows) long} the key position each head's last ``rows`` queries attend to
        most (causal, the layer's own window respected), and the (rows, V) logits there.
    """
    argmax: dict[int, torch.Tensor] = {}
    L = ids.shape[1]

    def keep(call: AttentionCall) -> None:
        answer = call.q[:1, :, -rows:].float()  # (1, Hq, rows, D)
        logits = grouped_scores(answer, call.k[:1].float())[0]  # (Hq, rows, Lk)
        seen = visible_keys(L - rows, L, call.k.shape[2], call.window, logits.device)
        argmax[call.layer_idx] = logits.masked_fill(~seen, float("-inf")).argmax(-1).cpu()

    with attention_calls(model, keep):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=rows)
    return argmax, out.logits[0, -rows:]


@torch.inference_mode()
def retrieval_scores(
    model,
    prompts: Iterable[NeedlePrompt],
    progress: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Retrieval score of every (layer, query head), pooled over ``prompts``.

    Returns:
        (layers, Hq) scores in [0, 1], the copy steps counted, and the prompts seen.

    Raises:
        UsageError: the model copied no needle token in any prompt (no score is defined).
    """
    device = next(model.parameters()).device
    fp = fingerprint(model.config)
    n_layers, n_heads = fp["num_hidden_layers"], fp["num_attention_heads"]
    hits = torch.zeros(n_layers, n_heads, dtype=torch.long)
    copies = seen = 0
    for prompt in prompts:
        if progress is not None:
            progress(prompt.label)
        start, end = prompt.span
        needle = prompt.ids[start:end]
        m = len(needle)
        ids = torch.tensor(prompt.ids + needle[:-1])  # (L,) the answer teacher-forced
        argmax, logits = answer_pass(model, ids[None].to(device), m)
        targets = torch.tensor(needle)  # (m,)
        copying = logits.argmax(-1).cpu() == targets  # (m,) the model copies
        for layer in range(n_layers):
            layer_hits, steps = copy_hits(argmax[layer], ids, prompt.span, targets, copying)
            hits[layer] += layer_hits
        copies += steps
        seen += 1
    if copies == 0:
        raise UsageError(
            f"the model copied no needle token in {seen} prompts (its top prediction was never "
            "the next needle token), so no retrieval score is defined; try shorter --lengths"
        )
    return hits.double() / copies, copies, seen


def retrieval_profile(
    model,
    tokenizer,
    *,
    model_id: str,
    lengths: list[int],
    seed: int = 0,
    samples: int = 6,
    progress: Callable[[str], None] | None = None,
    prompts: Iterable[NeedlePrompt] | None = None,
) -> dict[str, Any]:
    """Profile every head's retrieval score; returns the keyword arguments of ``save_profile``.

    Args:
        model_id: The name the model was loaded by (recorded in the profile).
        lengths: Prompt lengths in tokens.
        samples: Prompts per length.
        prompts: Other prompts than niah_single's (then ``lengths``, ``samples`` and ``seed``
            are only recorded).
    """
    if prompts is None:
        prompts = needle_prompts(tokenizer, lengths, seed, samples)
    scores, copies, seen = retrieval_scores(model, prompts, progress)
    summary: dict[str, list[float]] = {"max": [round(float(v), 4) for v in scores.max(-1).values]}
    for threshold in SUMMARY_THRESHOLDS:
        summary[f"heads>={threshold:g}"] = [int(v) for v in (scores >= threshold).sum(-1)]
    calibration = {
        "lengths": list(lengths),
        "seed": seed,
        "samples": samples,
        "task": "niah_single",
        "haystacks": list(HAYSTACKS),
        "prompts": seen,
        "copied_tokens": copies,
        "score": "hits / copied needle tokens; hit = argmax attention on the copied token in "
        "the needle; steps where the model's top prediction is not the needle token skipped",
    }
    return {
        "kind": "retrieval",
        "model": {"id": model_id, **fingerprint(model.config)},
        "calibration": calibration,
        "heads": {0.0: [[round(float(v), 4) for v in row] for row in scores]},
        "summary": {0.0: summary},
        "choices": None,
    }

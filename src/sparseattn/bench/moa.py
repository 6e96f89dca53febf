"""MoA span profiling (``sparseattn profile --kind moa``).

MoA (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", arXiv:2406.14909) profiles every head's sensitivity to a sliding-window span at
several lengths and picks one elastic rule span(N) = alpha + beta * N per head under a density
budget. Pieces: ``influence.py`` (first-order loss change of masking each attention entry, with
the softmax renormalisation), ``spans.py`` (the rule grid, kept shares, the budgeted choice).

Choices the paper leaves open, as made here:

- Calibration text: generated offline from the seed by the project's tasks (``MOA_TASKS``,
  ``samples`` each per length), each prompt followed by the dense model's own greedy response
  of ``response`` tokens (exactly that many: end-of-sequence is suppressed until then). The
  loss is the mean cross-entropy of that response given the prompt (MoA supervises with the
  model's own answers; a soft target of its own next-token distribution would have zero
  gradient). A profiled length is prompt + response.
- Influence: |E| of each entry per input (the reference implementation sums E over its
  calibration set and then takes the absolute value; here the absolute value is taken per
  input, so an entry cannot cancel itself out across inputs), averaged over the inputs of a
  length, summed over the query heads of a GQA group (the cache is per KV head), and summed
  over the profiled lengths to give each rule's predicted loss on a head.
- Sink: ``sink`` first tokens (64, the reference's one global block) kept by every rule; their
  entries are never dropped and never counted.
- Layers with their own sliding window (Gemma 3) keep at most that window whatever the rule;
  the budget counts what they really keep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..errors import UsageError
from ..profiles import fingerprint, span_at
from .influence import distance_influence, response_gradients
from .spans import (
    LEVELS,
    SINK,
    UNITS,
    kept_share,
    rule_losses,
    solve_budget,
    span_rules,
)

MOA_TASKS = ("niah_single", "variable_tracking", "qa")
RESPONSE_TOKENS = 32


def moa_prompts(
    tokenizer, lengths: list[int], seed: int, samples: int, response: int
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """(label, profiled length, (1, length - response) prompt ids) per length, task, sample."""
    from .tasks import build_task

    for length in lengths:
        for name in MOA_TASKS:
            for sample in range(samples):
                ids = build_task(name).generate(tokenizer, length - response, seed, sample)
                yield f"{name}@{length}#{sample}", length, torch.tensor([ids.input_ids])


@torch.no_grad()
def own_response(model, prompt: torch.Tensor, response: int) -> torch.Tensor:
    """(1, prompt + response) ids: the prompt and the model's greedy continuation of it."""
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=response,
        min_new_tokens=response,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        pad_token_id=pad,
    )
    return out[:, : prompt.shape[1] + response].clone()


def moa_profile(
    model,
    tokenizer,
    *,
    model_id: str,
    lengths: list[int],
    seed: int = 0,
    samples: int = 1,
    sink: int = SINK,
    response: int = RESPONSE_TOKENS,
    progress: Callable[[str], None] | None = None,
    prompts: Iterable[tuple[str, int, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Profile span rules per KV head; returns the keyword arguments of ``save_profile``.

    Args:
        model_id: The name the model was loaded by (recorded in the profile).
        lengths: Profiled lengths in tokens (prompt + response), at least two.
        samples: Prompts per (length, task).
        sink: First tokens every rule keeps.
        response: Tokens of the model's own response the loss is taken on.
        prompts: Other (label, length, prompt ids) than the tasks' (each prompt
            ``length - response`` tokens long).
    """
    if len(set(lengths)) < 2:
        raise UsageError(f"--lengths {lengths}: MoA profiles at least two different lengths")
    if sink < 0:
        raise UsageError(f"sink={sink} must be >= 0")
    if not 1 <= response < min(lengths) // 2:
        raise UsageError(f"response={response} must be in [1, {min(lengths) // 2 - 1}]")
    device = next(model.parameters()).device
    fp = fingerprint(model.config)
    n_layers, n_kv = fp["num_hidden_layers"], fp["num_key_value_heads"]
    if prompts is None:
        prompts = moa_prompts(tokenizer, lengths, seed, samples, response)
    totals: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    losses: dict[int, float] = {}
    windows: list[int | None] = [None] * n_layers
    start = time.perf_counter()
    for label, length, prompt in prompts:
        if progress is not None:
            progress(label)
        ids = own_response(model, prompt.to(device), response)
        captures, loss = response_gradients(model, ids, response)
        hists = []
        for layer in range(n_layers):
            capture = captures.pop(layer)
            windows[layer] = capture.window
            hists.append(distance_influence(capture, sink))  # (Hkv, L)
            del capture
        hist = torch.stack(hists)  # (layers, Hkv, L)
        totals[length] = totals[length] + hist if length in totals else hist
        counts[length] = counts.get(length, 0) + 1
        losses[length] = losses.get(length, 0.0) + loss
    if set(counts) != set(lengths):
        raise UsageError(f"no calibration input at lengths {sorted(set(lengths) - set(counts))}")
    rules = span_rules(lengths, sink)
    loss = sum(rule_losses(totals[n] / counts[n], rules) for n in lengths)  # (layers, Hkv, C)
    share = kept_share(rules, lengths, windows)  # (layers, C)
    C = len(rules)
    head_share = share[:, None, :].expand(n_layers, n_kv, C).reshape(-1, C)
    longest = max(lengths)
    heads: dict[float, list[list[int]]] = {}
    summary: dict[float, dict[str, list[float]]] = {}
    for level in LEVELS:
        chosen = solve_budget(loss.reshape(-1, C), head_share, level).view(n_layers, n_kv)
        picked_share = head_share.gather(1, chosen.view(-1, 1)).view(n_layers, n_kv)
        picked_loss = loss.gather(2, chosen[..., None])[..., 0]  # (layers, Hkv)
        spans = torch.tensor([[span_at(rules[c], longest) for c in row] for row in chosen.tolist()])
        heads[level] = chosen.tolist()
        summary[level] = {
            "share": [round(float(v), 4) for v in picked_share.mean(-1)],
            "loss": [float(f"{v:.4g}") for v in picked_loss.sum(-1)],
            f"span@{longest}": [round(float(v), 1) for v in spans.double().mean(-1)],
        }
    calibration = {
        "lengths": list(lengths),
        "seed": seed,
        "samples": samples,
        "tasks": list(MOA_TASKS),
        "response_tokens": response,
        "sink": sink,
        "response_loss": {str(n): round(losses[n] / counts[n], 4) for n in lengths},
        "sliding_layers": {str(i): w for i, w in enumerate(windows) if w is not None},
        "influence": "|first-order loss change of masking each entry (softmax renormalised)|, "
        "summed over the entries a rule drops, over the group's query heads and the lengths",
        "solver": f"exact multiple-choice knapsack, budget in 1/{UNITS} of a head",
        "seconds": round(time.perf_counter() - start, 1),
    }
    return {
        "kind": "moa",
        "model": {"id": model_id, **fingerprint(model.config)},
        "calibration": calibration,
        "heads": heads,
        "summary": summary,
        "choices": rules,
    }

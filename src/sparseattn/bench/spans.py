"""MoA's elastic span rules and the per-head choice under a KV budget.

MoA (Fu et al., arXiv:2406.14909) gives each head a sliding window whose span grows with the
input length N: span(N) = alpha + beta * N, alpha and beta from a discrete grid, plus the
first tokens kept as an attention sink (the reference implementation keeps one global block
of 64 tokens). A key j is kept for query i when j < sink or i - j < span, so a head holds
min(N, sink + span) keys, fewer in a layer whose own sliding window is narrower.

Choices the paper leaves open, as made here:

- Grid: alpha in ``ALPHAS`` tokens, beta in ``BETAS``; a rule is a candidate when its span is
  at least 1 at the shortest profiled length and at most the longest profiled length there
  (the full rule is alpha 0, beta 1). Rules are ordered by the share of the cache they keep.
- Budget: the share of the tokens a head keeps, averaged over the profiled lengths and over
  every KV head of the model (the KV cache is per KV head, so rules are chosen per KV head).
- Solver: the paper solves a mixed-integer program; the same problem (one rule per head, the
  summed predicted loss smallest, the mean kept share within the budget) is a multiple-choice
  knapsack, solved exactly here by dynamic programming over the budget in steps of 1/1000 of
  a head (each head's kept share is rounded up to a step, so the result is always within the
  budget). When no assignment fits, every head takes its sparsest rule.
"""

from __future__ import annotations

import math

import torch

from ..profiles import span_at

ALPHAS = (-1024, -512, -256, 0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BETAS = tuple(i / 8 for i in range(9))
SINK = 64
LEVELS = (0.1, 0.25, 0.5, 0.75)
UNITS = 1000  # budget steps per head


def span_rules(lengths: list[int], sink: int = SINK) -> list[dict]:
    """The candidate rules {"alpha", "beta", "sink"} for these profiled lengths, sparsest first."""
    low, high = min(lengths), max(lengths)
    rules = [
        {"alpha": alpha, "beta": beta, "sink": sink}
        for alpha in ALPHAS
        for beta in BETAS
        if alpha + beta * low >= 1 and alpha + beta * high <= high
    ]
    share = [sum(kept_tokens(r, n, None) / n for n in lengths) for r in rules]
    order = sorted(range(len(rules)), key=lambda i: (share[i], rules[i]["beta"]))
    return [rules[i] for i in order]


def kept_tokens(rule: dict, length: int, window: int | None) -> int:
    """Keys the last query of a ``length``-token input keeps under ``rule``, inside the
    layer's own sliding ``window`` (None: no window)."""
    span, sink = span_at(rule, length), min(rule["sink"], length)
    window = length if window is None else min(window, length)  # keys j >= length - window
    recent = min(window, span)  # the last keys: inside the window
    early = max(0, sink - (length - window))  # sink keys the window still reaches
    overlap = max(0, sink - length + recent)  # sink keys that are also recent
    return recent + early - overlap


def kept_share(rules: list[dict], lengths: list[int], windows: list[int | None]) -> torch.Tensor:
    """(layers, C) share of the tokens each rule keeps, averaged over ``lengths``."""
    return torch.tensor(
        [
            [sum(kept_tokens(r, n, w) / n for n in lengths) / len(lengths) for r in rules]
            for w in windows
        ],
        dtype=torch.float64,
    )


def rule_losses(hist: torch.Tensor, rules: list[dict]) -> torch.Tensor:
    """(..., C) predicted loss of each rule: the influence of every entry it drops.

    Args:
        hist: (..., L) summed |influence| per query-key distance (keys past the sink), from
            inputs of L tokens.
    """
    L = hist.shape[-1]
    tail = hist.flip(-1).cumsum(-1).flip(-1)  # tail[d] = sum of hist[d:]
    tail = torch.nn.functional.pad(tail, (0, 1))  # a span of L drops nothing
    spans = torch.tensor([span_at(r, L) for r in rules])
    return tail[..., spans]


def solve_budget(loss: torch.Tensor, share: torch.Tensor, budget: float) -> torch.Tensor:
    """One rule per head with the smallest summed loss whose mean share is within ``budget``.

    Args:
        loss: (H, C) predicted loss of each rule on each head.
        share: (H, C) share of the tokens each rule keeps on each head.
        budget: The largest allowed mean share over the H heads.

    Returns:
        (H,) long rule index per head (ties: the lower index).
    """
    H, C = loss.shape
    weight = torch.ceil(share * UNITS - 1e-6).long().clamp_min(0)  # (H, C) budget steps
    capacity = math.floor(budget * H * UNITS + 1e-6)
    if int(weight.min(1).values.sum()) > capacity:
        return share.argmin(1)
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # best[b]: least loss within b steps
    picks = torch.zeros(H, capacity + 1, dtype=torch.long)
    for h in range(H):
        new = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
        pick = torch.zeros(capacity + 1, dtype=torch.long)
        for c in range(C):
            w = int(weight[h, c])
            if w > capacity:
                continue
            candidate = torch.full_like(new, math.inf)
            candidate[w:] = best[: capacity + 1 - w] + float(loss[h, c])
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, c, pick)
        best, picks[h] = new, pick
    chosen = torch.zeros(H, dtype=torch.long)
    room = capacity
    for h in reversed(range(H)):
        chosen[h] = picks[h, room]
        room -= int(weight[h, chosen[h]])
    return chosen

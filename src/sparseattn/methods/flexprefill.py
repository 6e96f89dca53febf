"""FlexPrefill: per head and per input, query-aware or vertical-slash tiles by cumulative mass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, num_blocks
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .estimators import (
    diagonal_mass,
    grouped_scores,
    keep_cumulative_mass,
    last_query_probs,
    lines_to_tiles,
    pool_blocks,
)

_BIG = 2**31 - 1


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) of distributions along the last dim."""
    m = 0.5 * (p + q)
    eps = 1e-12

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * ((a + eps).log() - (b + eps).log())).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@register_method
@dataclass
class FlexPrefill(Method):
    """FlexPrefill (Lai et al., ICLR 2025, arXiv:2502.20766).

    Per (batch row, head): the last query tile's true attention, pooled per key tile, is compared
    with the estimate from its mean-pooled query against mean-pooled keys. If their
    Jensen-Shannon divergence is below ``tau`` the head is query-aware: pooled Q x pooled K tile
    scores for every query tile, and each row keeps its fewest tiles reaching ``gamma`` of the
    row's mass. Otherwise the head is vertical-slash: from the last queries' attention, the
    fewest key columns and the fewest diagonals each reaching ``gamma`` of their mass.
    Choices: JS divergence in nats, not its square root; ``min_budget`` is met by adding each
    row's best tiles by pooled score; the first 4 columns and 64 main diagonals are always kept.
    """

    name: ClassVar[str] = "flexprefill"
    paper: ClassVar[str] = (
        "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference (arXiv:2502.20766)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"gamma": 1.0}
    default_grid: ClassVar[dict] = {"gamma": [0.85, 0.9, 0.95]}

    gamma: float = knob(0.9, low=0.01, high=1.0, help="share of attention mass each row keeps")
    tau: float = knob(
        0.1, low=0.0, high=1.0, help="JS divergence below which a head is query-aware"
    )
    min_budget: int = knob(512, low=0, high=_BIG, help="tokens every query tile keeps at least")

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        B, H = q.shape[:2]
        if self.gamma >= 1.0:
            return layout.every_tile(H)
        b, nK = layout.block_size, layout.n_kv_blocks
        n = min(b, ctx.q_len)
        probs = last_query_probs(q, k, ctx, n)  # (B, H, n, Lk)
        true_tiles = (
            torch.nn.functional.pad(probs.mean(2), (0, nK * b - ctx.kv_len))
            .view(B, H, nK, b)
            .sum(-1)
        )
        pooled_k = pool_blocks(k, ctx.kv_len, b)  # (B, Hkv, nK, D)
        pooled_q = pool_blocks(q, ctx.q_len, b)  # (B, H, nQ, D)
        scores = grouped_scores(pooled_q, pooled_k) * ctx.scaling  # (B, H, nQ, nK)
        scores = (
            scores.masked_fill(~layout.visible[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        )
        last_q = (
            q[:, :, -n:].float().mean(2, keepdim=True)
        )  # (B, H, 1, D): the same queries as true_tiles
        estimate = grouped_scores(last_q, pooled_k).squeeze(2) * ctx.scaling  # (B, H, nK)
        estimate = estimate.masked_fill(~layout.visible[:, None, -1], float("-inf")).softmax(-1)
        query_aware = js_divergence(true_tiles, estimate) < self.tau  # (B, H)

        aware_tiles = keep_cumulative_mass(scores, self.gamma)
        columns = keep_cumulative_mass(probs.sum(2), self.gamma)
        offsets = keep_cumulative_mass(diagonal_mass(probs, ctx), self.gamma)
        slash_tiles = lines_to_tiles(columns, offsets, ctx, layout)
        mask = torch.where(query_aware[:, :, None, None], aware_tiles, slash_tiles)
        budget = min(num_blocks(self.min_budget, b), nK)
        if budget:
            best = scores.topk(budget, dim=-1).indices
            mask = mask.scatter(-1, best, True)
        return layout.finalize(mask)

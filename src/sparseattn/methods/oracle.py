"""Oracle top-p tiles from the true attention map: an upper bound, not a speedup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, base_token_mask
from ..backends.sdpa import decode_key_mask
from ..registry import register_method
from ..types import AttentionContext, BlockSelection, DecodeView, TokenSelection
from .base import Method, knob
from .estimators import grouped_scores, keep_cumulative_mass

_QUERY_CHUNK = 1024


def true_tile_mass(
    q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, layout: BlockLayout
) -> torch.Tensor:
    """(B, Hq, nQ, nK) float32: attention probability mass of every tile, summed over its queries.

    Computed exactly in float32 in query chunks of 1024 (memory O(chunk x Lk) per head), each
    KV head's keys shared by its query heads.
    """
    b = layout.block_size
    kf = k.float()  # (B, Hkv, Lk, D): one fp32 copy at most, shared by each KV head's queries
    mass = torch.zeros(
        ctx.batch, ctx.num_q_heads, layout.n_q_blocks, layout.n_kv_blocks, device=q.device
    )
    pad_k = layout.n_kv_blocks * b - ctx.kv_len
    for start in range(0, ctx.q_len, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, ctx.q_len)
        scores = grouped_scores(q[:, :, start:stop].float(), kf) * ctx.scaling  # (B, Hq, c, Lk)
        scores = scores.masked_fill(~base_token_mask(ctx, start, stop), float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # (B, Hq, c, Lk)
        probs = torch.nn.functional.pad(probs, (0, pad_k))
        per_key_tile = probs.view(*probs.shape[:3], layout.n_kv_blocks, b).sum(-1)  # (B, Hq, c, nK)
        q_tile = torch.arange(start, stop, device=q.device) // b
        mass.index_add_(2, q_tile, per_key_tile)
    return mass


@register_method
@dataclass
class Oracle(Method):
    """Oracle top-p: keep the fewest tiles per query-tile row holding >= ``top_p`` of its true mass.

    Computes the full attention map to choose, so it is an upper bound on what any estimator
    can recall at a given density, never a speedup. Choices: mass is summed over the queries of
    a tile (each query's probabilities sum to 1), ranked per (batch, head, query tile).
    """

    name: ClassVar[str] = "oracle"
    paper: ClassVar[str] = (
        "The Sparse Frontier: Sparse Attention Trade-offs in Transformer LLMs (arXiv:2504.17768)"
    )
    is_speedup: ClassVar[bool] = False
    dense_limit: ClassVar[dict] = {"top_p": 1.0}
    default_grid: ClassVar[dict] = {"top_p": [0.8, 0.9, 0.95]}

    top_p: float = knob(
        0.95, low=0.01, high=1.0, help="share of each row's true attention mass to keep"
    )

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        if self.top_p >= 1.0:
            return layout.every_tile(ctx.num_q_heads)
        mass = true_tile_mass(q, k, ctx, layout)
        return layout.finalize(keep_cumulative_mass(mass, self.top_p))

    def select_decode(self, q, view: DecodeView, ctx: AttentionContext) -> TokenSelection | None:
        """Decode: per query head, the fewest held tokens holding ``top_p`` of the exact mass."""
        if self.top_p >= 1.0:
            return None
        B, Hq, _, D = q.shape
        rows = q.float().view(B, ctx.num_kv_heads, ctx.groups, D)  # (B, Hkv, g, D)
        scores = torch.matmul(rows, view.keys.float().transpose(-1, -2)) * ctx.scaling
        if ctx.softcap is not None:
            scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
        visible = decode_key_mask(ctx)  # (B, 1 or Hkv, 1, Lk)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        keep = keep_cumulative_mass(probs.view(B, Hq, -1), self.top_p)  # (B, Hq, Lk)
        indices = torch.arange(ctx.kv_len, device=q.device).expand_as(keep)
        return TokenSelection(indices=indices, valid=keep)

"""HiP attention: a hierarchical top-k search for each query tile's key tiles, O(L log L)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..backends.masks import BlockLayout, num_blocks, query_positions, row_starts
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .common import row_sink_tiles

_BIG = 2**31 - 1


def search_ranges(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nQ) first and stop key tile of each query tile's search: its visible tiles before the
    first tile holding its own positions (that diagonal tile is always kept)."""
    visible = layout.visible  # (B, nQ, nK)
    nK = layout.n_kv_blocks
    index = torch.arange(nK, device=visible.device)
    own = layout.diagonal.float().argmax(-1)  # (nQ,) first diagonal tile
    before = visible & (index < own[:, None])[None]
    lo = torch.where(before, index, nK).amin(-1)  # (B, nQ)
    hi = torch.where(before, index + 1, 0).amax(-1)
    return lo, torch.maximum(hi, lo)


def representative_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: AttentionContext,
    b: int,
    first: torch.Tensor,
    stop: torch.Tensor,
) -> torch.Tensor:
    """(B, Hq, nQ, C) score of each node: the largest scaled logit of the query tile's queries
    with the node's middle key (its representative), -inf for empty nodes.

    Args:
        q: (B, Hq, Lq, D) queries.
        k: (B, Hkv, Lk, D) keys.
        first, stop: (B, Hq, nQ, C) key tile ranges [first, stop) of the nodes.
    """
    B, Hq, Lq, D = q.shape
    Hkv, g = ctx.num_kv_heads, ctx.groups
    nQ, C = first.shape[2:]
    begin = first * b
    start = row_starts(ctx)
    if start is not None:  # a node starting in left padding is represented by a real key
        begin = torch.maximum(begin, (start - ctx.kv_offset).view(B, 1, 1, 1))
    end = (stop * b).clamp(max=ctx.kv_len)
    middle = ((begin + end - 1) // 2).clamp(0, ctx.kv_len - 1)  # (B, Hq, nQ, C)
    index = middle.view(B, Hkv, g * nQ * C, 1).expand(-1, -1, -1, D)
    reps = k.float().gather(2, index).view(B, Hkv, g, nQ, C, D)
    rows = F.pad(q.float(), (0, 0, 0, nQ * b - Lq)).view(B, Hkv, g, nQ, b, D)
    scores = torch.einsum("bhgqrd,bhgqcd->bhgqrc", rows, reps).view(B, Hq, nQ, b, C)
    q_pos = F.pad(query_positions(ctx), (0, nQ * b - Lq), value=-1).view(1, 1, nQ, b, 1)
    k_pos = (middle + ctx.kv_offset)[:, :, :, None, :]  # (B, Hq, nQ, 1, C)
    seen = (k_pos <= q_pos) & (end > begin)[:, :, :, None, :]
    if ctx.sliding_window is not None:
        seen &= q_pos - k_pos < ctx.sliding_window
    if ctx.key_valid is not None:
        real = ctx.key_valid.gather(1, middle.view(B, -1)).view(B, Hq, nQ, 1, C)
        seen &= real
    return (scores * ctx.scaling).masked_fill(~seen, float("-inf")).amax(3)


@register_method
@dataclass
class HiPAttention(Method):
    """HiP attention (Lee et al., ICLR 2025, arXiv:2406.09827): hierarchically pruned top-k.

    Per query tile and head, the key tiles before its diagonal are split into k = budget / b
    equal nodes; each round splits every node in two, scores each half by its middle key (the
    largest logit of the tile's queries with it) and keeps the k best halves, until every node
    is one tile: log2(L / (k b)) rounds of 2k key reads per query tile, O(L log L) in all. The
    k tiles found, the row's first tile (the attention sink) and the diagonal are computed.

    Choices: the paper's key block is our tile (its per-token top-k with key blocks of size
    b_k becomes top-k tiles of ``block_size``); the query block is the query tile (HiP's
    block approximation); a node starting in left padding is represented by the middle of its
    real keys; ties between halves go to ``torch.topk``'s order.
    """

    name: ClassVar[str] = "hip"
    paper: ClassVar[str] = (
        "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with "
        "Hierarchically Pruned Attention (arXiv:2406.09827)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [512, 1024, 2048]}

    budget: int = knob(
        1024,
        low=1,
        high=_BIG,
        help="tokens searched per query tile (whole tiles), plus sink and diagonal",
    )

    def tiles(self, layout: BlockLayout) -> int:
        """k: key tiles the search keeps per query tile."""
        return min(num_blocks(self.budget, layout.block_size), layout.n_kv_blocks)

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        B, Hq = q.shape[:2]
        b, nQ, nK = layout.block_size, layout.n_q_blocks, layout.n_kv_blocks
        n = self.tiles(layout)
        lo, hi = search_ranges(layout)  # (B, nQ)
        span = (hi - lo)[:, None, :, None]  # (B, 1, nQ, 1)
        part = torch.arange(n + 1, device=ctx.device)
        edges = lo[:, None, :, None] + span * part // n  # (B, 1, nQ, n + 1): k equal nodes
        first = edges[..., :-1].expand(B, Hq, nQ, n).contiguous()
        stop = edges[..., 1:].expand(B, Hq, nQ, n).contiguous()
        while bool((stop - first > 1).any()):
            middle = first + (stop - first + 1) // 2
            halves_first = torch.cat([first, middle], -1)  # (B, Hq, nQ, 2n)
            halves_stop = torch.cat([middle, stop], -1)
            scores = representative_scores(q, k, ctx, b, halves_first, halves_stop)
            best = scores.topk(n, dim=-1).indices
            first, stop = halves_first.gather(-1, best), halves_stop.gather(-1, best)
        found = stop > first  # (B, Hq, nQ, n): nodes of one tile
        mask = torch.zeros(B, Hq, nQ, nK + 1, dtype=torch.bool, device=ctx.device)
        mask.scatter_(-1, torch.where(found, first, nK), True)
        mask = mask[..., :nK] | row_sink_tiles(layout, 1)[:, None]
        return layout.finalize(mask)

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        diagonal = int(layout.diagonal.sum(-1).max())
        return min(layout.n_kv_blocks, self.tiles(layout) + 1 + diagonal)

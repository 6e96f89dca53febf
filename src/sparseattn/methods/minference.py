"""MInference 1.0 patterns: vertical-slash from the last queries, and pooled block top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, base_token_mask
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .common import sink_tiles, window_tiles

_BIG = 2**31 - 1
_FORCED_COLUMNS = 4  # the first keys (attention sink) are always vertical lines
_FORCED_DIAGONALS = 64  # the main diagonals (local window) are always slashes


def last_query_probs(
    q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, n_last: int
) -> torch.Tensor:
    """(B, Hq, n, Lk) float32 true attention of the last ``n`` queries (causal, window, padding)."""
    n = min(n_last, ctx.q_len)
    kf = k.float().repeat_interleave(ctx.groups, dim=1)  # (B, Hq, Lk, D)
    scores = torch.matmul(q[:, :, -n:].float(), kf.transpose(-1, -2)) * ctx.scaling
    visible = base_token_mask(ctx)[:, :, -n:]  # (B, 1, n, Lk)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)


def vertical_slash_tiles(
    probs: torch.Tensor,
    ctx: AttentionContext,
    layout: BlockLayout,
    vertical_size: int,
    slash_size: int,
) -> torch.Tensor:
    """(B, Hq, nQ, nK) bool tiles covering the top vertical columns and top slash diagonals.

    Args:
        probs: (B, Hq, n, Lk) attention of the last n queries.
    """
    B, H, n, Lk = probs.shape
    b, dev = layout.block_size, ctx.device
    nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
    # forced on top of the budget: sink columns and the main diagonals
    forced = sink_tiles(layout, ctx.kv_offset + _FORCED_COLUMNS) | window_tiles(
        layout, _FORCED_DIAGONALS
    )
    tiles = forced[None, None].expand(B, H, -1, -1).clone()
    # vertical: column mass
    column = probs.sum(2)  # (B, H, Lk)
    column[..., :_FORCED_COLUMNS] = float("-inf")
    top_cols = column.topk(min(vertical_size, Lk), dim=-1).indices  # (B, H, v)
    col_tiles = torch.zeros(B, H, nK, dtype=torch.bool, device=dev)
    col_tiles.scatter_(-1, top_cols // b, True)
    tiles |= col_tiles[:, :, None, :]
    # slash: mass per diagonal offset (query position - key position), main diagonals forced
    q_pos = torch.arange(ctx.q_len - n, ctx.q_len, device=dev) + ctx.q_offset  # (n,)
    offsets = q_pos[:, None] - (torch.arange(Lk, device=dev) + ctx.kv_offset)[None, :]  # (n, Lk)
    max_offset = ctx.q_offset + ctx.q_len - ctx.kv_offset
    index = offsets.clamp(0, max_offset).expand(B, H, n, Lk).reshape(B, H, -1)
    slash = torch.zeros(B, H, max_offset + 1, device=dev).scatter_add_(
        -1, index, probs.reshape(B, H, -1)
    )
    slash[..., :_FORCED_DIAGONALS] = float("-inf")
    top_offsets = slash.topk(min(slash_size, slash.shape[-1]), dim=-1).indices  # (B, H, s)
    # a diagonal at offset o crosses, in query tile i, the key tiles of positions [first - o, last - o]
    q_first = torch.arange(nQ, device=dev) * b + ctx.q_offset - ctx.kv_offset
    q_last = (
        (torch.arange(nQ, device=dev) * b + b - 1).clamp(max=ctx.q_len - 1)
        + ctx.q_offset
        - ctx.kv_offset
    )
    crossed = torch.zeros(
        B, H, nQ, nK + 1, dtype=torch.bool, device=dev
    )  # last column: off the map
    for edge in (q_first, q_last):
        key = edge[None, None, :, None] - top_offsets[:, :, None, :]  # (B, H, nQ, s)
        tile = torch.where((key >= 0) & (key < Lk), key // b, nK)
        crossed.scatter_(-1, tile, True)
    return tiles | crossed[..., :nK]


@register_method
@dataclass
class VerticalSlash(Method):
    """MInference's vertical-slash pattern (Jiang et al., NeurIPS 2024, arXiv:2407.02490).

    The last ``last_queries`` queries attend densely to every key; their summed attention per
    key ranks vertical columns and per diagonal offset ranks slash lines; the top
    ``vertical_size`` columns and ``slash_size`` diagonals are kept for every query, executed as
    the tiles they cross. Choices: the first 4 columns and the 64 main diagonals are always kept;
    columns and diagonals are chosen per (batch row, query head), the forced ones on top of the
    budget; the estimate uses the exact
    attention of the last queries in float32.
    """

    name: ClassVar[str] = "vertical_slash"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs (arXiv:2407.02490)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"vertical_size": _BIG}
    default_grid: ClassVar[dict] = {"vertical_size": [128, 512], "slash_size": [128, 512]}

    last_queries: int = knob(
        64, low=1, high=4096, help="final queries whose attention ranks columns and diagonals"
    )
    vertical_size: int = knob(256, low=1, high=_BIG, help="key columns kept")
    slash_size: int = knob(256, low=1, high=_BIG, help="diagonals kept")

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        probs = last_query_probs(q, k, ctx, self.last_queries)
        tiles = vertical_slash_tiles(probs, ctx, layout, self.vertical_size, self.slash_size)
        return layout.finalize(tiles)

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        forced = 1 + -(-(_FORCED_DIAGONALS + layout.block_size - 1) // layout.block_size) + 1
        return min(layout.n_kv_blocks, self.vertical_size + 2 * self.slash_size + forced)


@register_method
@dataclass
class BlockSparse(Method):
    """MInference's block-sparse pattern: mean-pooled Q and K tiles, top-k key tiles per query tile.

    Choices: pooled scores are scaled like attention logits and soft-maxed over the visible key
    tiles of each row before ranking (ranking is the same without the softmax); pooling ignores
    padded keys only through the visibility mask, not in the means.
    """

    name: ClassVar[str] = "block_sparse"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs (arXiv:2407.02490)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"top_k": 1 << 20}
    default_grid: ClassVar[dict] = {"top_k": [4, 8, 16]}

    top_k: int = knob(
        8, low=1, high=1 << 20, help="key tiles kept per query tile (plus the diagonal)"
    )

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        b = layout.block_size
        nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
        pad_q, pad_k = nQ * b - ctx.q_len, nK * b - ctx.kv_len
        qp = (
            torch.nn.functional.pad(q.float(), (0, 0, 0, pad_q)).unflatten(2, (nQ, b)).mean(3)
        )  # (B, Hq, nQ, D)
        kf = k.float().repeat_interleave(ctx.groups, dim=1)
        kp = (
            torch.nn.functional.pad(kf, (0, 0, 0, pad_k)).unflatten(2, (nK, b)).mean(3)
        )  # (B, Hq, nK, D)
        scores = torch.matmul(qp, kp.transpose(-1, -2)) * ctx.scaling
        scores = scores.masked_fill(~layout.visible[:, None], float("-inf"))
        top = scores.softmax(-1).topk(min(self.top_k, nK), dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return layout.finalize(mask)

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        return self.top_k + 1

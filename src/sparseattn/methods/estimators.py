"""Estimators shared by methods: cheap views of where attention mass lies, and rules that
turn estimated mass into kept lines or tiles.

- ``grouped_scores``: query-key dot products under grouped-query attention, the keys read
  once per KV head (never copied per query head);
- ``pool_blocks``: mean-pooled queries or keys, one vector per tile;
- ``last_query_probs``: the exact attention of the last queries, and ``diagonal_mass`` its
  mass per diagonal offset (vertical lines and slashes);
- ``top_lines`` and ``keep_cumulative_mass``: keep the highest entries by count or by mass;
- ``lines_to_tiles``: the tiles that kept columns and diagonals cross.
"""

from __future__ import annotations

import torch

from ..backends.masks import BlockLayout, base_token_mask, num_blocks
from ..types import AttentionContext
from .common import sink_tiles, window_tiles

FORCED_COLUMNS = 4  # the first keys (attention sink) are always vertical lines
FORCED_DIAGONALS = 64  # the main diagonals (local window) are always slashes


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Dot products of every query with every key of its own KV head.

    The g = Hq / Hkv query heads sharing a KV head are stacked into one matrix, so one matmul
    per KV head reads its keys once: no copy of the keys per query head.

    Args:
        q: (B, Hq, n, D) queries.
        k: (B, Hkv, Lk, D) keys, of q's dtype.

    Returns:
        (B, Hq, n, Lk) scores (unscaled).
    """
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    rows = q.reshape(B, Hkv, Hq // Hkv * n, D)  # (B, Hkv, g n, D): query head h = kv g + j
    return torch.matmul(rows, k.transpose(-1, -2)).view(B, Hq, n, -1)  # (B, Hq, n, Lk)


def pool_blocks(x: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, nB, D) mean over each block of ``block_size`` (ragged end padded)."""
    n = num_blocks(length, block_size)
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block_size - length))
    sums = x.view(*x.shape[:2], n, block_size, -1).sum(3)
    counts = torch.full((n,), float(block_size), device=x.device)
    counts[-1] = length - (n - 1) * block_size
    return sums / counts[:, None]


def last_query_probs(
    q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, n_last: int
) -> torch.Tensor:
    """(B, Hq, n, Lk) float32 true attention of the last ``n`` queries (causal, window, padding)."""
    n = min(n_last, ctx.q_len)
    scores = grouped_scores(q[:, :, -n:].float(), k.float()) * ctx.scaling  # (B, Hq, n, Lk)
    visible = base_token_mask(ctx, ctx.q_len - n)  # (B, 1, n, Lk)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)


def diagonal_mass(probs: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hq, O) attention mass of the last queries summed per diagonal offset (query - key).

    Args:
        probs: (B, Hq, n, Lk) attention of the last n queries.
    """
    B, H, n, Lk = probs.shape
    dev = probs.device
    q_pos = torch.arange(ctx.q_len - n, ctx.q_len, device=dev) + ctx.q_offset  # (n,)
    offsets = q_pos[:, None] - (torch.arange(Lk, device=dev) + ctx.kv_offset)[None, :]  # (n, Lk)
    max_offset = ctx.q_offset + ctx.q_len - ctx.kv_offset
    index = offsets.clamp(0, max_offset).expand(B, H, n, Lk).reshape(B, H, -1)
    return torch.zeros(B, H, max_offset + 1, device=dev).scatter_add_(
        -1, index, probs.reshape(B, H, -1)
    )


def top_lines(scores: torch.Tensor, size: int, forced: int) -> torch.Tensor:
    """(..., n) bool: the first ``forced`` entries and the ``size`` highest of the others."""
    ranked = scores.clone()
    ranked[..., :forced] = float("-inf")
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, ranked.topk(min(size, scores.shape[-1]), dim=-1).indices, True)
    keep[..., :forced] = True
    return keep


def keep_cumulative_mass(scores: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Keep the fewest highest-scoring entries whose share of the row's total is >= threshold.

    Args:
        scores: (..., n) non-negative scores (zero where not allowed).
        threshold: Fraction in (0, 1], or a tensor of fractions broadcastable to (..., 1)
            (e.g. one per head); >= 1 keeps every positive entry.

    Returns:
        (..., n) bool.
    """
    if not isinstance(threshold, torch.Tensor) and threshold >= 1.0:
        return scores > 0
    if isinstance(threshold, torch.Tensor):
        threshold = torch.where(threshold >= 1.0, torch.inf, threshold)
    total = scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    before = (sorted_scores.cumsum(-1) - sorted_scores) / total  # mass strictly before each entry
    keep_sorted = (before < threshold) & (sorted_scores > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def lines_to_tiles(
    columns: torch.Tensor, offsets: torch.Tensor, ctx: AttentionContext, layout: BlockLayout
) -> torch.Tensor:
    """(B, Hq, nQ, nK) bool tiles crossed by the kept key columns and diagonals, plus the forced ones.

    Args:
        columns: (B, Hq, Lk) bool, key columns to keep for every query.
        offsets: (B, Hq, O) bool, diagonal offsets (query position - key position) to keep.
    """
    B, H, Lk = columns.shape
    b, dev = layout.block_size, ctx.device
    nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
    pad = nK * b - Lk
    col_tiles = torch.nn.functional.pad(columns, (0, pad)).view(B, H, nK, b).any(-1)  # (B, H, nK)
    # offset o, query tile i: keys [i b + e, i b + e + b - 1] with e = (q_offset - kv_offset) - o,
    # so the crossed key tiles are i + floor(e / b) and i + floor((e + b - 1) / b)
    o = torch.arange(offsets.shape[-1], device=dev)
    e = (ctx.q_offset - ctx.kv_offset) - o
    shifts = torch.stack(
        [torch.div(e, b, rounding_mode="floor"), torch.div(e + b - 1, b, rounding_mode="floor")]
    )
    low = int(shifts.min())
    width = int(shifts.max()) - low + 1
    rel = torch.zeros(B, H, width, dtype=torch.bool, device=dev)
    for shift in shifts:  # two edges of a query tile
        rel.scatter_reduce_(-1, (shift - low).expand(B, H, -1), offsets, reduce="amax")
    j_minus_i = (
        torch.arange(nK, device=dev)[None, :] - torch.arange(nQ, device=dev)[:, None] - low
    )  # (nQ, nK)
    inside = (j_minus_i >= 0) & (j_minus_i < width)
    diag_tiles = rel[:, :, j_minus_i.clamp(0, width - 1)] & inside  # (B, H, nQ, nK)
    forced = sink_tiles(layout, ctx.kv_offset + FORCED_COLUMNS) | window_tiles(
        layout, FORCED_DIAGONALS
    )
    return diag_tiles | col_tiles[:, :, None, :] | forced

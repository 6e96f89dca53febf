"""Selection helpers shared by methods: static tile patterns, cumulative-mass selection."""

from __future__ import annotations

import torch

from ..backends.masks import BlockLayout, num_blocks


def tile_ranges(
    layout: BlockLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Absolute position ranges of tiles.

    Returns:
        q_first, q_last: (nQ,) first and last absolute query position of each query tile.
        k_first, k_last: (nK,) first and last absolute key position of each key tile.
    """
    ctx, b = layout.ctx, layout.block_size
    q_first = torch.arange(layout.n_q_blocks, device=ctx.device) * b
    q_last = (q_first + b - 1).clamp(max=ctx.q_len - 1)
    k_first = torch.arange(layout.n_kv_blocks, device=ctx.device) * b
    k_last = (k_first + b - 1).clamp(max=ctx.kv_len - 1)
    return (
        q_first + ctx.q_offset,
        q_last + ctx.q_offset,
        k_first + ctx.kv_offset,
        k_last + ctx.kv_offset,
    )


def sink_tiles(layout: BlockLayout, sink: int) -> torch.Tensor:
    """(nQ, nK) bool: key tiles holding any of the first ``sink`` positions."""
    _, _, k_first, _ = tile_ranges(layout)
    return (k_first < sink)[None, :].expand(layout.n_q_blocks, -1)


def window_tiles(layout: BlockLayout, window: int) -> torch.Tensor:
    """(nQ, nK) bool: key tiles overlapping the last ``window`` positions before some query."""
    q_first, q_last, k_first, k_last = tile_ranges(layout)
    starts = q_first - window + 1  # (nQ,) earliest key any query of the tile may keep
    return (k_last[None, :] >= starts[:, None]) & (k_first[None, :] <= q_last[:, None])


def per_head(tiles: torch.Tensor, layout: BlockLayout, num_heads: int) -> torch.Tensor:
    """(nQ, nK) -> (B, H, nQ, nK) view shared by every batch row and head."""
    return tiles[None, None].expand(layout.ctx.batch, num_heads, -1, -1)


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


def pool_blocks(x: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, nB, D) mean over each block of ``block_size`` (ragged end padded)."""
    n = num_blocks(length, block_size)
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block_size - length))
    sums = x.view(*x.shape[:2], n, block_size, -1).sum(3)
    counts = torch.full((n,), float(block_size), device=x.device)
    counts[-1] = length - (n - 1) * block_size
    return sums / counts[:, None]

"""Static tile patterns shared by methods: tile position ranges, sink and window tiles."""

from __future__ import annotations

import torch

from ..backends.masks import BlockLayout, row_starts


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


def row_sink_tiles(layout: BlockLayout, sink: int) -> torch.Tensor:
    """(B or 1, nQ, nK) bool: key tiles holding any of each row's first ``sink`` valid
    positions, so a left-padded row keeps its own first tokens, not the padding before them
    (one row, as ``sink_tiles``, when no row is padded)."""
    start = row_starts(layout.ctx)
    if start is None:
        return sink_tiles(layout, sink)[None]
    _, _, k_first, k_last = tile_ranges(layout)
    start = start[:, None]  # (B, 1)
    hit = (k_first[None] < start + sink) & (k_last[None] >= start)  # (B, nK)
    return hit[:, None, :].expand(-1, layout.n_q_blocks, -1)


def window_tiles(layout: BlockLayout, window: int) -> torch.Tensor:
    """(nQ, nK) bool: key tiles overlapping the last ``window`` positions before some query."""
    q_first, q_last, k_first, k_last = tile_ranges(layout)
    starts = q_first - window + 1  # (nQ,) earliest key any query of the tile may keep
    return (k_last[None, :] >= starts[:, None]) & (k_first[None, :] <= q_last[:, None])


def per_head(tiles: torch.Tensor, layout: BlockLayout, num_heads: int) -> torch.Tensor:
    """(nQ, nK) or (B or 1, nQ, nK) -> (B, H, nQ, nK) view shared by every head (and by every
    batch row when the pattern has no row axis)."""
    tiles = tiles if tiles.dim() == 3 else tiles[None]  # (B or 1, nQ, nK)
    return tiles[:, None].expand(layout.ctx.batch, num_heads, -1, -1)

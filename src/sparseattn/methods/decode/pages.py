"""Static page patterns for decode: which pages of a contiguous cache a rule keeps.

Page p holds slots [p * P, (p + 1) * P). Patterns are computed from Python lengths (never from
tensor values), cached per length, and returned as index tensors of a static size, so a decode
step gathers them without a sort or a host sync.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...backends.masks import num_blocks, row_starts
from ...types import AttentionContext, PageSelection


def sink_window_pages(ctx: AttentionContext, page_size: int, sink: int, window: int) -> list[int]:
    """Pages holding a position < ``sink`` or one of the last ``window`` positions before the query.

    Valid for contiguous keys (slot = position - kv_offset); the decode query sits at q_offset.
    """
    P, Lk = page_size, ctx.kv_len
    n_pages = -(-Lk // P)
    sink_slots = min(max(sink - ctx.kv_offset, 0), Lk)
    pages = set(range(-(-sink_slots // P)))
    query_slot = ctx.q_offset - ctx.kv_offset
    first = max(query_slot - window + 1, 0)
    pages.update(range(first // P, min(query_slot // P, n_pages - 1) + 1))
    return sorted(p for p in pages if p < n_pages)


@lru_cache(maxsize=256)
def _page_rows(rows: tuple[tuple[int, ...], ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    pages = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        pages[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        valid[i, : len(row)] = True
    return pages.to(device), valid.to(device)


def page_selection(
    rows: list[list[int]], batch: int, page_size: int, device: torch.device
) -> PageSelection:
    """PageSelection from one page list per head row (KV or query heads), shared by batch rows."""
    pages, valid = _page_rows(tuple(tuple(r) for r in rows), str(device))
    n_rows, width = pages.shape
    return PageSelection(
        pages=pages[None].expand(batch, n_rows, width),
        valid=valid[None].expand(batch, n_rows, width),
        page_size=page_size,
    )


def with_row_sinks(
    rows: list[list[int]], ctx: AttentionContext, page_size: int, sink: int
) -> PageSelection:
    """The pages of ``rows`` (one list per head row, shared by batch rows, no sink pages) plus
    each batch row's sink pages: those holding its first ``sink`` valid positions, which left
    padding moves. Computed on the device from ``row_starts(ctx)``: no host read.

    A row's sink spans at most ceil((sink + P - 1) / P) pages (``sink`` slots starting
    anywhere in a page); a sink page a head row already reads, or one past the row's sink, is
    marked invalid so no slot is read twice.

    Returns:
        PageSelection with pages and valid of (B, H, n + sink pages), H = len(rows).
    """
    P, B, n_pages = page_size, ctx.batch, all_pages(ctx, page_size)
    width = num_blocks(sink + P - 1, P) if sink > 0 else 0
    if width == 0:
        return page_selection(rows, B, P, ctx.device)
    start = row_starts(ctx)
    if start is None:  # no row is padded: every row starts at 0 (static sink pages are cheaper)
        start = torch.zeros(B, dtype=torch.long, device=ctx.device)
    pages, valid = _page_rows(tuple(tuple(r) for r in rows), str(ctx.device))  # (H, w)
    H = pages.shape[0]
    held = torch.zeros(H, n_pages + 1, dtype=torch.bool, device=ctx.device)
    held.scatter_(1, pages.masked_fill(~valid, n_pages), True)  # (H, nP + 1): read already
    slot = start - ctx.kv_offset  # (B,) the row's first valid slot (< 0: dropped by a window)
    sink_pages = slot.clamp(min=0)[:, None] // P + torch.arange(width, device=ctx.device)
    inside = (sink_pages * P < (slot + sink)[:, None]) & (sink_pages < n_pages)  # (B, width)
    sink_pages = sink_pages.clamp(max=n_pages)  # (B, width); n_pages: the spare column
    fresh = inside[:, None] & ~held[:, sink_pages].transpose(0, 1)  # (B, H, width)
    sink_pages = sink_pages.clamp(max=n_pages - 1)[:, None].expand(B, H, width)
    return PageSelection(
        pages=torch.cat([pages[None].expand(B, H, -1), sink_pages], -1),
        valid=torch.cat([valid[None].expand(B, H, -1), fresh], -1),
        page_size=P,
    )


def all_pages(ctx: AttentionContext, page_size: int) -> int:
    return -(-ctx.kv_len // page_size)

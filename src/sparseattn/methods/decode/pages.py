"""Static page patterns for decode: which pages of a contiguous cache a rule keeps.

Page p holds slots [p * P, (p + 1) * P). Patterns are computed from Python lengths (never from
tensor values), cached per length, and returned as index tensors of a static size, so a decode
step gathers them without a sort or a host sync.
"""

from __future__ import annotations

from functools import lru_cache

import torch

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


def all_pages(ctx: AttentionContext, page_size: int) -> int:
    return -(-ctx.kv_len // page_size)

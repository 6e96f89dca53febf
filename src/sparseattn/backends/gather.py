"""Decode execution: gather a fixed budget of pages (or tokens) of the cache, then SDPA over them.

Selections with one row per KV head are executed grouped: the query heads of a GQA group are
the rows of one SDPA call against their KV head's gathered keys, so nothing is copied per query
head. The gather is ``torch.gather`` on a page view of the cache, sized by the budget; nothing
here sorts keys or reads a value back to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import AttentionContext, PageSelection, TokenSelection
from . import cpp
from .masks import key_positions


def selection_slots(
    selection: PageSelection | TokenSelection,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot indices (B, Hs, K) and their validity (B, Hs, K) of a page or token selection."""
    if isinstance(selection, TokenSelection):
        return selection.indices, selection.valid
    P = selection.page_size
    offsets = torch.arange(P, device=selection.pages.device)
    slots = (selection.pages[..., None] * P + offsets).flatten(-2)  # (B, Hs, n * P)
    valid = selection.valid[..., None].expand(*selection.valid.shape, P).flatten(-2)
    if selection.tail is not None:
        start, stop = selection.tail
        tail = torch.arange(start, stop, device=slots.device).expand(*slots.shape[:2], -1)
        slots = torch.cat([slots, tail], -1)
        valid = torch.cat([valid, torch.ones_like(tail, dtype=torch.bool)], -1)
    return slots, valid


def visible_slots(slots: torch.Tensor, valid: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hs, K) bool: selected slots that exist and are visible to the decode query."""
    valid = valid & (slots < ctx.kv_len)
    index = slots.clamp(max=ctx.kv_len - 1)
    positions = key_positions(ctx)  # (B or 1, Hp, Lk)
    Hs, Hp = slots.shape[1], positions.shape[1]
    if Hp > 1 and Hs != Hp:  # per-KV-head positions, one selection row per query head
        positions = positions.repeat_interleave(ctx.groups, dim=1)
    positions = positions.expand(slots.shape[0], Hs, -1).gather(-1, index)
    query = ctx.q_offset  # one query
    visible = positions <= query
    if ctx.sliding_window is not None:
        visible = visible & (query - positions < ctx.sliding_window)
    if ctx.key_valid is not None:
        visible = visible & ctx.key_valid[:, None, :].expand(-1, Hs, -1).gather(-1, index)
    return valid & visible


def _rows_view(x: torch.Tensor, row: int) -> tuple[torch.Tensor, int]:
    """(B * H * capacity / row, row * D) view of a cache tensor's storage, and its capacity.

    ``x`` is (B, H, S, D), typically a slice of a contiguous (B, H, capacity, D) buffer; one row
    of the view holds ``row`` consecutive slots of one (batch row, head). Copies only when the
    storage does not have that shape.
    """
    B, H, S, D = x.shape
    capacity = x.stride(1) // D if x.stride(1) % D == 0 else 0
    strided = x.stride(3) == 1 and x.stride(2) == D and x.stride(0) == H * x.stride(1)
    if not strided or capacity % row or capacity < S:
        capacity = -(-S // row) * row
        x = torch.nn.functional.pad(x.contiguous(), (0, 0, 0, capacity - S))
    view = x.as_strided((B * H * capacity // row, row * D), (row * D, 1), x.storage_offset())
    return view, capacity


def _gather(x: torch.Tensor, index: torch.Tensor, heads: torch.Tensor, row: int) -> torch.Tensor:
    """Rows (pages or tokens) ``index`` (B, Hs, n) of head ``heads`` (Hs,) per batch row:
    (B, Hs, n * row, D), one ``index_select`` of contiguous rows."""
    B, H, _, D = x.shape
    view, capacity = _rows_view(x, row)
    per_head = capacity // row
    base = (torch.arange(B, device=x.device)[:, None] * H + heads[None, :]) * per_head  # (B, Hs)
    flat = (base[..., None] + index).flatten()
    Hs, n = index.shape[1], index.shape[2]
    return view.index_select(0, flat).view(B, Hs, n * row, D)


def gather_pages_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: PageSelection,
    ctx: AttentionContext,
) -> torch.Tensor:
    """Decode over every selected page and the tail, all known visible: no mask is built.

    For a layer whose held keys are all visible (contiguous, no padding, no window) and a
    selection whose entries are all valid, one row per KV head. On the CPU in float32 the C++
    kernel reads the pages in place (``cpp.page_decode``); otherwise the pages are gathered
    from the cache storage with one index shared by K and V, the tail is a slice of the cache,
    and the g query heads of a KV head attend as the rows of one SDPA call.
    Returns (B, 1, Hq, Dv).
    """
    B, Hq, _, D = q.shape
    Hkv, g, P = k.shape[1], ctx.groups, selection.page_size
    pages = selection.pages  # (B, Hkv, n)
    rows = q.view(B, Hkv, g, D)
    tail = selection.tail or (0, 0)
    if ctx.softcap is None and ctx.key_bias is None and cpp.runs_on(q) and cpp.available():
        out = cpp.page_decode(rows, k, v, pages, P, tail, ctx.scaling)  # pages read in place
        return out.reshape(B, Hq, 1, -1).transpose(1, 2)
    k_view, capacity = _rows_view(k, P)
    v_view, _ = _rows_view(v, P)
    base = torch.arange(B * Hkv, device=q.device).view(B, Hkv, 1) * (capacity // P)
    flat = (base + pages).flatten()
    n = pages.shape[2]
    k_sel = k_view.index_select(0, flat).view(B, Hkv, n * P, D)
    v_sel = v_view.index_select(0, flat).view(B, Hkv, n * P, -1)
    if selection.tail is not None:
        start, stop = selection.tail
        k_sel = torch.cat([k_sel, k[:, :, start:stop]], 2)
        v_sel = torch.cat([v_sel, v[:, :, start:stop]], 2)
    out = attend_rows(rows, k_sel, v_sel, None, ctx)  # (B, Hkv, g, Dv)
    return out.reshape(B, Hq, 1, -1).transpose(1, 2)


def gather_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: PageSelection | TokenSelection,
    ctx: AttentionContext,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend one query per head to its selected pages or tokens.

    Args:
        q: (B, Hq, 1, D).
        k: (B, Hkv, S, D) keys, usually a view of the cache's buffer (pages are read straight
            from its storage; slots past ``ctx.kv_len`` are never visible).
        v: (B, Hkv, S, Dv).
        selection: Pages or tokens, one row per KV head (grouped) or per query head.
        ctx: The call's context (q_len must be 1).
        visible: ``visible_slots`` of the selection if the caller already has it.

    Returns:
        (B, 1, Hq, Dv).
    """
    if ctx.q_len != 1:
        raise ValueError(f"gather backend runs decode calls (q_len=1), got q_len={ctx.q_len}")
    slots, valid = selection_slots(selection)
    mask = visible_slots(slots, valid, ctx) if visible is None else visible  # (B, Hs, K)
    B, Hq, _, D = q.shape
    Hkv, g, Hs = k.shape[1], ctx.groups, slots.shape[1]
    heads = torch.arange(Hs, device=q.device) // (1 if Hs == Hkv else g)
    if isinstance(selection, PageSelection):
        index, row = selection.pages, selection.page_size
    else:
        index, row = selection.indices, 1
    k_sel, v_sel = _gather(k, index, heads, row), _gather(v, index, heads, row)  # (B, Hs, K, D)
    if isinstance(selection, PageSelection) and selection.tail is not None:
        start, stop = selection.tail  # read after the pages, as selection_slots lists them
        k_tail, v_tail = k[:, :, start:stop], v[:, :, start:stop]
        if Hs != Hkv:
            k_tail, v_tail = k_tail.index_select(1, heads), v_tail.index_select(1, heads)
        k_sel, v_sel = torch.cat([k_sel, k_tail], 2), torch.cat([v_sel, v_tail], 2)
    rows = q.view(B, Hkv, g, D) if Hs == Hkv else q  # grouped: g query rows per KV head
    out = attend_rows(rows, k_sel, v_sel, mask[:, :, None, :], ctx)
    return out.reshape(B, Hq, 1, -1).transpose(1, 2)


def attend_rows(
    rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    ctx: AttentionContext,
) -> torch.Tensor:
    """SDPA of query rows (B, H, R, D) against (B, H, K, D), with softcap when the model has one."""
    if ctx.softcap is None:
        return F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=ctx.scaling)
    scores = torch.matmul(rows.float(), k.float().transpose(-1, -2)) * ctx.scaling
    scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive float mask
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, -1).nan_to_num(0.0), v.float()).to(rows.dtype)

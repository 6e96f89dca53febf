"""Dense attention through PyTorch SDPA, straight on the cache: the baseline every ratio divides.

Decode runs grouped: the g query heads of a KV head are g query rows of one call against that
head's keys, so GQA costs no copy of K or V; no mask is built when every held key is visible
(the common case), and masks come from key positions when some are not. On the CPU in float32
a decode step whose every held key is visible runs the C++ decode kernel over the whole cache
(``cpp.page_decode`` with no pages and every slot as its tail), split over the keys across
threads; SDPA otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import AttentionContext
from . import cpp
from .gather import attend_rows
from .masks import base_token_mask, key_positions


def window_matters(ctx: AttentionContext) -> bool:
    """True when the layer's own sliding window may hide some key from some query."""
    if ctx.sliding_window is None:
        return False
    if not ctx.contiguous:
        return True
    return ctx.q_offset + ctx.q_len - 1 - ctx.kv_offset >= ctx.sliding_window


def decode_key_mask(ctx: AttentionContext) -> torch.Tensor:
    """(B, 1 or Hkv, 1, Lk) bool: keys the decode query sees (causal, window, padding)."""
    positions = key_positions(ctx)  # (B or 1, Hp, Lk)
    query = ctx.q_offset
    mask = positions <= query
    if ctx.sliding_window is not None:
        mask = mask & (query - positions < ctx.sliding_window)
    if ctx.key_valid is not None:
        mask = mask & ctx.key_valid[:, None, :]
    return mask[:, :, None, :].expand(ctx.batch, -1, -1, -1)


def with_key_bias(mask: torch.Tensor | None, ctx: AttentionContext) -> torch.Tensor | None:
    """A bool mask (or None) as an additive float mask carrying ``ctx.key_bias``; unchanged
    when the call has no bias. Broadcasts like the mask (B, H, R, Lk)."""
    if ctx.key_bias is None:
        return mask
    bias = ctx.key_bias[:, :, None, :]  # (B, 1, 1, Lk)
    if mask is None:
        return bias
    return torch.where(mask, bias, float("-inf"))


DENSE_BLOCK = 128  # keys per block when the C++ kernel reads the whole cache at decode
_NO_PAGES: dict[tuple[int, int], torch.Tensor] = {}


def _no_pages(batch: int, kv_heads: int) -> torch.Tensor:
    """(B, Hkv, 0) long CPU page list (every slot is the kernel's tail), made once per shape."""
    pages = _NO_PAGES.get((batch, kv_heads))
    if pages is None:
        pages = _NO_PAGES[(batch, kv_heads)] = torch.empty(batch, kv_heads, 0, dtype=torch.long)
    return pages


def kernel_decode(
    rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Every held slot visible to every query row: (B, Hkv, g, D) -> (B, Hkv, g, Dv) with the C++
    decode kernel over all slots as its tail (call ``cpp.runs_on`` / ``cpp.available`` first).
    It splits over the keys across threads (SDPA splits over KV heads only: 3 of them on 2 cores
    leave one idle)."""
    none = _no_pages(rows.shape[0], rows.shape[1])
    return cpp.page_decode(rows, k, v, none, DENSE_BLOCK, (0, k.shape[2]), scaling)


def dense_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, all_visible: bool
) -> torch.Tensor:
    """One query per head against every held key. Returns (B, 1, Hq, Dv).

    Args:
        q: (B, Hq, 1, D).
        k: (B, Hkv, Lk, D), typically a view of the cache's buffer.
        v: (B, Hkv, Lk, Dv).
        ctx: The call's context.
        all_visible: The caller knows every held key is visible (no mask is built).
    """
    B, Hq, _, D = q.shape
    rows = q.view(B, ctx.num_kv_heads, ctx.groups, D)  # (B, Hkv, g, D)
    plain = all_visible and ctx.softcap is None and ctx.key_bias is None
    if plain and cpp.runs_on(q) and cpp.available():
        out = kernel_decode(rows, k, v, ctx.scaling)
        return out.reshape(B, Hq, 1, -1).transpose(1, 2)
    mask = None if all_visible else decode_key_mask(ctx)
    out = attend_rows(rows, k, v, with_key_bias(mask, ctx), ctx)  # (B, Hkv, g, Dv)
    return out.reshape(B, Hq, 1, -1).transpose(1, 2)


def dense_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
) -> torch.Tensor:
    """The model's own dense attention for a prompt chunk through SDPA: (B, Lq, Hq, Dv).

    Causal without a mask when keys are contiguous, unpadded and aligned with the queries;
    otherwise a token mask built from positions (padding, evicted caches, windows).
    """
    gqa = ctx.groups > 1
    aligned = ctx.contiguous and ctx.q_offset + ctx.q_len == ctx.kv_offset + ctx.kv_len
    plain = aligned and ctx.key_valid is None and not window_matters(ctx) and ctx.key_bias is None
    if plain and ctx.q_len == ctx.kv_len:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=ctx.scaling, enable_gqa=gqa
        )
    else:
        mask = base_token_mask(ctx)  # (B, 1 or Hq, Lq, Lk)
        mask = mask | ~mask.any(-1, keepdim=True)  # padded query rows: finite garbage, never NaN
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=with_key_bias(mask, ctx), scale=ctx.scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2)


def visible_keys(ctx: AttentionContext) -> torch.Tensor:
    """(B, 1 or Hq) float64 number of (query, key) pairs dense attention computes."""
    return base_token_mask(ctx).sum((-1, -2), dtype=torch.float64)


__all__ = ["decode_key_mask", "dense_decode", "dense_prefill", "visible_keys", "window_matters"]

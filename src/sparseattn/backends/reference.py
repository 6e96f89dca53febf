"""Dense masked attention in float32: the oracle every other backend is tested against."""

from __future__ import annotations

import torch

from ..types import AttentionContext, BlockSelection, Selection
from .gather import selection_slots
from .masks import base_token_mask, expand_blocks, heads_to_query_heads


def selected_keys(selection: Selection, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hq, Lq or 1, Lk) bool: the (query, key) pairs a selection chooses (before visibility)."""
    if isinstance(selection, BlockSelection):
        return expand_blocks(selection.mask, selection.block_size, ctx.q_len, ctx.kv_len)
    slots, valid = selection_slots(selection)  # (B, Hs, K)
    Lk = ctx.kv_len
    chosen = torch.zeros(*slots.shape[:2], Lk + 1, dtype=torch.bool, device=slots.device)
    spare = torch.where(valid & (slots < Lk), slots, Lk)  # padding, slots past the keys -> spare
    chosen = chosen.scatter_(-1, spare, True)[..., :Lk]
    if chosen.shape[1] != ctx.num_q_heads:
        chosen = heads_to_query_heads(chosen, ctx)
    return chosen[:, :, None, :]


def selection_token_mask(selection: Selection | None, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hq or 1, Lq, Lk) bool: the base mask restricted to the selected tiles/pages/tokens."""
    mask = base_token_mask(ctx)  # (B, 1 or Hq, Lq, Lk)
    if selection is None:
        return mask
    return mask & selected_keys(selection, ctx)


def reference_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection | None,
    ctx: AttentionContext,
) -> torch.Tensor:
    """Attention over the selected pairs only, computed densely in float32.

    Args:
        q: (B, Hq, Lq, D).
        k: (B, Hkv, Lk, D) (a page selection may index past Lk: those slots never count).
        v: (B, Hkv, Lk, Dv).
        selection: Tiles, pages or tokens to keep; None = the dense base mask.
        ctx: The call's context.

    Returns:
        (B, Lq, Hq, Dv) in q's dtype. Rows with no visible key (padded queries) are zero.
    """
    B, Hq, Lq, D = q.shape
    Hkv, g = ctx.num_kv_heads, ctx.groups
    k, v = k[:, :, : ctx.kv_len].float(), v[:, :, : ctx.kv_len].float()
    rows = q.float().reshape(B, Hkv, g * Lq, D)  # the g query heads of a KV head, stacked
    scores = torch.matmul(rows, k.transpose(-1, -2)) * ctx.scaling  # (B, Hkv, g * Lq, Lk)
    scores = scores.view(B, Hq, Lq, -1)
    if ctx.softcap is not None:
        scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
    if ctx.key_bias is not None:
        scores = scores + ctx.key_bias[:, :, None, :].float()
    mask = selection_token_mask(selection, ctx)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    out = torch.matmul(probs.view(B, Hkv, g * Lq, -1), v)  # (B, Hkv, g * Lq, Dv)
    return out.view(B, Hq, Lq, -1).transpose(1, 2).to(q.dtype)

"""Dense masked attention in float32: the oracle every other backend is tested against."""

from __future__ import annotations

import torch

from ..types import AttentionContext, BlockSelection, KVSelection
from .masks import base_token_mask, expand_blocks


def selection_token_mask(
    selection: BlockSelection | KVSelection | None, ctx: AttentionContext
) -> torch.Tensor:
    """(B, Hq or 1, Lq, Lk) bool: base mask restricted to the selected tiles or tokens."""
    mask = base_token_mask(ctx)  # (B, 1, Lq, Lk)
    if selection is None:
        return mask
    if isinstance(selection, BlockSelection):
        chosen = expand_blocks(selection.mask, selection.block_size, ctx.q_len, ctx.kv_len)
    else:
        chosen = torch.zeros(
            ctx.batch, ctx.num_q_heads, ctx.kv_len, dtype=torch.bool, device=mask.device
        )
        chosen.scatter_(-1, selection.indices, selection.valid)  # padded slots write False
        chosen = chosen[:, :, None, :].expand(-1, -1, ctx.q_len, -1)
    return mask & chosen


def reference_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection | KVSelection | None,
    ctx: AttentionContext,
) -> torch.Tensor:
    """Attention over the selected pairs only, computed densely in float32.

    Args:
        q: (B, Hq, Lq, D).
        k: (B, Hkv, Lk, D).
        v: (B, Hkv, Lk, Dv).
        selection: Tiles or tokens to keep; None = the dense base mask.
        ctx: The call's context.

    Returns:
        (B, Lq, Hq, Dv) in q's dtype. Rows with no visible key (padded queries) are zero.
    """
    g = ctx.groups
    kf = k.float().repeat_interleave(g, dim=1)  # (B, Hq, Lk, D)
    vf = v.float().repeat_interleave(g, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * ctx.scaling  # (B, Hq, Lq, Lk)
    if ctx.softcap is not None:
        scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
    mask = selection_token_mask(selection, ctx)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    out = torch.matmul(probs, vf)  # (B, Hq, Lq, Dv)
    return out.transpose(1, 2).to(q.dtype)

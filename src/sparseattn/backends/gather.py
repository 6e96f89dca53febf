"""Decode execution: gather the selected keys and values, then run SDPA over them only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import AttentionContext, BlockSelection, KVSelection
from .masks import base_token_mask, expand_blocks


def blocks_to_tokens(selection: BlockSelection, ctx: AttentionContext) -> KVSelection:
    """Turn a one-query block selection into per-head token indices (visible keys only)."""
    if ctx.q_len != 1:
        raise ValueError(f"gather backend runs decode calls (q_len=1), got q_len={ctx.q_len}")
    chosen = expand_blocks(selection.mask, selection.block_size, 1, ctx.kv_len)[
        :, :, 0
    ]  # (B, Hq, Lk)
    chosen = chosen & base_token_mask(ctx)[:, :, 0]  # one query row
    return mask_to_kv_selection(chosen)


def mask_to_kv_selection(chosen: torch.Tensor) -> KVSelection:
    """(B, Hq, Lk) bool -> KVSelection holding the True positions, rows padded to the longest."""
    counts = chosen.sum(-1)  # (B, Hq)
    width = max(int(counts.max()), 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=chosen.device) < counts[..., None]
    return KVSelection(indices=order, valid=valid)


def gather_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection | KVSelection,
    ctx: AttentionContext,
) -> torch.Tensor:
    """Attend one query per head to its selected tokens.

    Args:
        q: (B, Hq, 1, D).
        k: (B, Hkv, Lk, D).
        v: (B, Hkv, Lk, D).
        selection: Tiles (converted to tokens) or tokens; KVSelection indices must be visible.
        ctx: The call's context (q_len must be 1).

    Returns:
        (B, 1, Hq, D).
    """
    if isinstance(selection, BlockSelection):
        selection = blocks_to_tokens(selection, ctx)
    B, Hq = q.shape[:2]
    b_idx = torch.arange(B, device=q.device)[:, None, None]  # (B, 1, 1)
    h_idx = (torch.arange(Hq, device=q.device) // ctx.groups)[None, :, None]  # (1, Hq, 1)
    k_sel = k[b_idx, h_idx, selection.indices]  # (B, Hq, K, D)
    v_sel = v[b_idx, h_idx, selection.indices]
    if ctx.softcap is not None:
        scores = torch.matmul(q.float(), k_sel.float().transpose(-1, -2)) * ctx.scaling
        scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
        scores = scores.masked_fill(~selection.valid[:, :, None], float("-inf"))
        out = torch.matmul(torch.softmax(scores, -1).nan_to_num(0.0), v_sel.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(
            q, k_sel, v_sel, attn_mask=selection.valid[:, :, None, :], scale=ctx.scaling
        )  # (B, Hq, 1, D)
    return out.transpose(1, 2)

"""Shared pieces of the token-level decode methods: forced tokens, the GQA vote, top-k.

Every function works on static shapes from Python lengths and knobs, so a decode step built
from them reads no tensor value on the host.
"""

from __future__ import annotations

import torch

from ...backends.masks import key_positions, sink_positions
from ...backends.sdpa import decode_key_mask, window_matters
from ...errors import UsageError
from ...types import EMPTY_POSITION, AttentionContext, TokenSelection
from ..estimators import grouped_scores


def check_budget(name: str, budget: int, sink: int, window: int) -> None:
    """UsageError unless ``budget`` covers the tokens always read (sink + window + current)."""
    forced = sink + window + 1
    if budget < forced:
        raise UsageError(
            f"{name}: knob budget={budget} is below what is always read (sink {sink} + window "
            f"{window} + the current token = {forced}); allowed: budget >= {forced}"
        )


def forced_tokens(ctx: AttentionContext, sink: int, window: int) -> torch.Tensor:
    """(B or 1, 1 or Hkv, Lk) bool: held slots always read (each row's first ``sink`` valid
    positions, after its left padding; the last ``window`` positions before the query; and the
    current token)."""
    positions = key_positions(ctx)  # (B or 1, 1 or Hkv, Lk)
    held = positions != EMPTY_POSITION
    recent = positions > ctx.q_offset - max(window, 1)
    return (sink_positions(positions, ctx, sink) | recent) & held


def group_vote(scores: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hkv, g, Lk) logits -> (B, Hkv, Lk): each query head's softmax, summed over its GQA
    group, so a head with larger logits does not drown the others.

    The softmax runs over the keys the query sees: padding, empty slots and keys outside the
    layer's window take no share, so a padded row votes as it would alone.
    """
    logits = scores * ctx.scaling
    if ctx.key_valid is None and ctx.contiguous and not window_matters(ctx):
        return torch.softmax(logits, dim=-1).sum(2)  # every held key is visible
    visible = decode_key_mask(ctx)  # (B, 1 or Hkv, 1, Lk)
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # a row seeing nothing: 0


def kv_head_scores(q: torch.Tensor, keys: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hq, 1, D) query and (B, Hkv, Lk, D) keys -> (B, Hkv, g, Lk) unscaled fp32 q.k,
    without copying K per query head."""
    scores = grouped_scores(q.float(), keys.float())  # (B, Hq, 1, Lk)
    return scores.view(ctx.batch, ctx.num_kv_heads, ctx.groups, -1)


def top_tokens(
    scores: torch.Tensor, forced: torch.Tensor, budget: int, ctx: AttentionContext
) -> TokenSelection:
    """The ``budget`` slots with the highest score per row, forced slots first.

    Args:
        scores: (B, Hs, Lk) float, Hs = Hkv (one choice per GQA group) or Hq.
        forced: bool broadcastable to ``scores``.
        budget: Tokens per row; every slot when it covers the cache (a method returns None,
            dense, before that unless ``dense_when_covered`` is off).
    """
    visible = _visible(ctx, scores.shape[1])
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(forced & visible, float("inf"))
    indices = scores.topk(min(budget, ctx.kv_len), dim=-1).indices
    every = not (bool(ctx.key_valid is not None) or not ctx.contiguous or ctx.sliding_window)
    return TokenSelection(  # on an all-visible cache every pick is a held slot: all visible
        indices=indices, valid=torch.ones_like(indices, dtype=torch.bool), all_valid=every
    )


def _visible(ctx: AttentionContext, rows: int) -> torch.Tensor:
    """(B, 1 or rows, Lk) bool: slots the query may see (never chosen over a visible one)."""
    visible = decode_key_mask(ctx)[:, :, 0]  # (B, 1 or Hkv, Lk)
    if visible.shape[1] > 1 and visible.shape[1] != rows:
        visible = visible.repeat_interleave(rows // visible.shape[1], dim=1)
    return visible

"""One attention call from start to end: find its cache layer and phase, build its context,
run the prefill or decode path, let the eviction policy score, release the call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..cache import CacheLayer, HeadGroup, HeadGroupsLayer, KVLayer
from ..types import AttentionContext, Phase
from .decode import run_decode
from .plan import SparsePlan, phase_of
from .prefill import run_prefill


@dataclass
class CallInput:
    """One attention call as transformers hands it over (mask info already read)."""

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    q_offset: int
    kv_offset: int
    padding: torch.Tensor | None  # (B, total) bool 2-D mask over absolute positions, or None
    padding_known_absent: bool  # a prefill checked the mask: nothing is padded
    scaling: float
    sliding_window: int | None
    softcap: float | None
    row_start: torch.Tensor | None = None  # (B,) first valid position of each row, or None


@dataclass(frozen=True)
class GroupCall:
    """How a call over a head group's keys differs from a whole-layer call.

    Attributes:
        group: The head group (its own methods, if any).
        heads: (h,) indices of its query heads among the layer's.
        num_heads: The layer's query heads (for the stats).
    """

    group: HeadGroup
    heads: torch.Tensor
    num_heads: int


def run_layer(plan: SparsePlan, call: CallInput) -> torch.Tensor:
    """Select, execute, record and evict for one attention call. Returns (B, Lq, Hq, D).

    A layer split into head groups runs its first prompt once over every head (each group's
    own prefill pattern merged into one selection), and any later call per group over the
    keys that group holds.
    """
    layer = plan.cache_layer(call.layer_idx, call.key)
    if isinstance(layer, HeadGroupsLayer) and not layer.whole:
        return _run_groups(plan, call, layer)
    return _run_call(plan, call, layer)


def _run_groups(plan: SparsePlan, call: CallInput, layer: HeadGroupsLayer) -> torch.Tensor:
    """One call per head group, over that group's keys; outputs assembled in head order."""
    B, Hq, Lq, _ = call.query.shape
    groups = Hq // call.key.shape[1]
    out = None
    for group, heads in zip(layer.groups, layer.query_heads(groups)):
        keys, values, _ = group.layer.call_view()
        part = dataclasses.replace(
            call, query=call.query.index_select(1, heads), key=keys, value=values
        )
        done = _run_call(plan, part, group.layer, GroupCall(group, heads, Hq))  # (B, Lq, h, Dv)
        if out is None:
            out = done.new_empty(B, Lq, Hq, done.shape[-1])
        out.index_copy_(2, heads, done)
    layer.finish_call()  # the groups are done; the layer lets go of the call
    return out


def _run_call(
    plan: SparsePlan, call: CallInput, layer: CacheLayer | None, part: GroupCall | None = None
) -> torch.Tensor:
    """One attention call over ``layer``'s keys (all heads, or one head group's)."""
    query, key, value = call.query, call.key, call.value
    B, Hq, Lq, _ = query.shape
    positions, q_offset, kv_offset = None, call.q_offset, call.kv_offset
    if layer is not None:
        _, _, positions = layer.call_view()
        q_offset = layer.seen - Lq
        kv_offset = 0 if positions is None else layer.seen - key.shape[2]
    phase = phase_of(Lq, q_offset)
    key_valid = _key_valid(call, layer, phase, positions, kv_offset, key.shape[2])
    if layer is not None and key_valid is not None and phase.is_prefill:
        layer.mark_padding(key_valid)  # explicit positions take the padding; contiguous keep it
        if positions is not None:
            key_valid = None
    # each row's sink follows its padding: known where keys are padded or positions explicit
    padded = not call.padding_known_absent and (key_valid is not None or positions is not None)
    ctx = AttentionContext(
        layer_idx=call.layer_idx,
        phase=phase,
        batch=B,
        q_len=Lq,
        kv_len=key.shape[2],
        q_offset=q_offset,
        kv_offset=kv_offset,
        num_q_heads=Hq,
        num_kv_heads=key.shape[1],
        scaling=call.scaling,
        sliding_window=call.sliding_window,
        softcap=call.softcap,
        key_valid=key_valid,
        key_positions=positions,
        device=query.device,
        key_bias=None if layer is None else layer.key_bias(),
        row_start=call.row_start if padded else None,
    )
    if phase is Phase.DECODE:
        out = run_decode(plan, ctx, query, key, value, layer, part)
    else:
        out = run_prefill(plan, ctx, query, key, value, layer, part)
        if layer is not None and plan.evict is not None and plan.evict.needs_queries:
            plan.evict.after_prefill(layer, query, ctx)
    if layer is not None:
        layer.finish_call()
    return out


def _key_valid(
    call: CallInput,
    layer: KVLayer | None,
    phase: Phase,
    positions: torch.Tensor | None,
    kv_offset: int,
    kv_len: int,
) -> torch.Tensor | None:
    """(B, Lk) padding of this call's keys, or None when nothing is (known to be) padded.

    Prefill calls check the mask (one host sync per forward); decode steps never look: a layer
    remembers from its prefill whether it holds padding, and a layer with explicit positions
    carries padding as empty slots.
    """
    if call.padding is None or call.padding_known_absent:
        return None
    if phase is Phase.DECODE and layer is not None and (positions is not None or not layer.padded):
        return None
    if positions is None:
        return call.padding[:, kv_offset : kv_offset + kv_len]
    index = positions[:, 0].clamp(max=call.padding.shape[1] - 1)
    return call.padding.gather(1, index) | (positions[:, 0] >= call.padding.shape[1])

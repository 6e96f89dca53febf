"""A prompt chunk's attention: dense through SDPA where it can, else the method's tiles through
the prefill kernel; records the pairs computed and visible."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..backends import BlockLayout, dense_prefill, reference_attend
from ..backends.sdpa import visible_keys, window_matters
from ..backends.tiles import attend_tiles, density_once, select_once, tile_kernel
from ..cache import CacheLayer, HeadGroupsLayer, KVLayer
from ..methods.base import Method, PrefillCall
from ..methods.static import Dense
from ..types import AttentionContext, BlockSelection, Phase
from .plan import SparsePlan
from .stats import timed

if TYPE_CHECKING:
    from .execute import GroupCall

STATS_BLOCK = 128  # tile size of the visible-pair count of a dense call


def run_prefill(
    plan: SparsePlan,
    ctx: AttentionContext,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: CacheLayer | None = None,
    part: GroupCall | None = None,
) -> torch.Tensor:
    """A prompt chunk: dense through SDPA where it can, else the method's tiles through a kernel.

    Dense calls whose window hides keys (or with a softcap) on contiguous keys run as every
    visible tile through the tile kernel (``prefill_backend``), never as a dense masked L x L
    product, and so do chunks after a prefix where the C++ kernel runs them (``tiles_pay``);
    over explicit positions (a layer that evicted) they run as a contiguous chunk where every
    held key precedes it (``as_contiguous_chunk``), else as masked SDPA over what it kept.
    The first prompt of a layer split into head groups runs as one selection in which each
    group with a prefill method of its own has that method's tiles.
    """
    method = plan.method_for(ctx, q, None if part is None else part.group)
    patterns = _group_patterns(plan, ctx, q, layer)
    heads = None if part is None else (part.heads, part.num_heads)
    profile = plan.options.timing
    start = timed(ctx.device) if profile else 0.0
    dense = isinstance(method, Dense) and not patterns
    if dense and not ctx.contiguous:
        ctx = as_contiguous_chunk(ctx, layer)
    if dense and not ctx.contiguous:
        out = (
            dense_prefill(q, k, v, ctx)
            if ctx.softcap is None
            else reference_attend(q, k, v, None, ctx)
        )
    elif dense and ctx.softcap is None and not window_matters(ctx) and not tiles_pay(plan, q, ctx):
        out = dense_prefill(q, k, v, ctx)
    else:
        layout = plan.layout_for(ctx, method.block_size)
        run = None if patterns else method.rearrange(q, k, v, ctx, layout)
        if run is None:  # the call as it is, with the method's tiles
            selection = select_once(method, q, k, ctx, layout)
            if patterns:
                selection = _merge_patterns(selection, patterns, q, k, ctx, layout)
            run = PrefillCall(k, v, ctx, layout, selection)
        selected = timed(ctx.device) if profile else 0.0
        out = attend_tiles(
            plan.options.prefill_backend, q, run.k, run.v, run.selection, run.ctx, run.layout
        )
        done = timed(ctx.device) if profile else 0.0
        computed, visible = density_once(run.layout, run.selection)
        if run.layout is not layout:  # rearranged keys: the visible pairs are the call's own
            visible = layout.counts.sum((-1, -2), dtype=torch.float64)[:, None].expand_as(computed)
        name = (
            method.name
            if not patterns
            else "+".join([method.name, *(m.name for *_, m in patterns)])
        )
        plan.stats.record(
            ctx.layer_idx,
            ctx.phase,
            name,
            computed,
            visible,
            selected - start,
            done - selected,
            heads,
        )
        return out
    visible = _dense_pairs(plan, ctx)
    attend_s = timed(ctx.device) - start if profile else 0.0
    plan.stats.record(ctx.layer_idx, ctx.phase, method.name, visible, visible, 0.0, attend_s, heads)
    return out


def as_contiguous_chunk(ctx: AttentionContext, layer: CacheLayer | None) -> AttentionContext:
    """A dense prompt chunk over a layer that evicted, as a contiguous call where that is exact.

    When the layer holds no hole and no padding (``prefix_precedes_call``), every held key is
    older than the chunk and visible to all its queries, and the chunk's own keys are causal:
    the mask of a contiguous chunk whose keys start ``kv_len - q_len`` positions before it. Run
    that way, the chunk goes through the tile kernel (or causal SDPA) instead of a masked
    product whose scores (heads x chunk x held) would be materialised. Left as it is under a
    sliding window, a softcap or a key bias, which depend on more than the order of keys.
    """
    if (
        not isinstance(layer, KVLayer)
        or ctx.phase is not Phase.CHUNKED_PREFILL
        or ctx.sliding_window is not None
        or ctx.softcap is not None
        or ctx.key_bias is not None
        or ctx.key_valid is not None
        or not layer.prefix_precedes_call()
    ):
        return ctx
    start = ctx.q_offset + ctx.q_len - ctx.kv_len
    return dataclasses.replace(ctx, key_positions=None, kv_offset=start, row_start=None)


def tiles_pay(plan: SparsePlan, q: torch.Tensor, ctx: AttentionContext) -> bool:
    """Whether a dense contiguous call runs faster as every visible tile through the C++ kernel
    than through SDPA: a chunk after a prefix or padded rows (SDPA needs a token mask there; the
    kernel skips the masked tiles) on a call the kernel supports."""
    plain = ctx.q_len == ctx.kv_len and ctx.key_valid is None
    if plain or ctx.key_bias is not None or plan.options.prefill_backend not in ("auto", "cpp"):
        return False
    return tile_kernel("auto", q, ctx) == "cpp"


def _group_patterns(
    plan: SparsePlan, ctx: AttentionContext, q: torch.Tensor, layer: CacheLayer | None
) -> list[tuple[torch.Tensor, torch.Tensor, Method]]:
    """(query heads, KV heads, method) of each group of a whole grouped call that prefills with
    a method of its own (none where the layer or call stays dense)."""
    if not isinstance(layer, HeadGroupsLayer) or not layer.whole:
        return []
    patterns = []
    for group, index, heads in zip(layer.groups, layer._index, layer.query_heads(ctx.groups)):
        method = plan.method_for(ctx, q, group) if group.prefill is not None else None
        if method is not None and not isinstance(method, Dense):
            patterns.append((heads, index, method))
    return patterns


def _merge_patterns(
    selection: BlockSelection,
    patterns: list[tuple[torch.Tensor, torch.Tensor, Method]],
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: AttentionContext,
    layout: BlockLayout,
) -> BlockSelection:
    """``selection`` with each pattern's query heads replaced by its method's own tiles."""
    B, Hq = ctx.batch, ctx.num_q_heads
    mask = selection.mask.expand(B, Hq, -1, -1).clone()  # (B, Hq, nQ, nK)
    for heads, kv_heads, method in patterns:
        part = dataclasses.replace(ctx, num_q_heads=heads.shape[0], num_kv_heads=kv_heads.shape[0])
        own = select_once(
            method, q.index_select(1, heads), k.index_select(1, kv_heads), part, layout
        )
        mask[:, heads] = own.mask.expand(B, heads.shape[0], -1, -1)
    return BlockSelection(mask=mask, block_size=selection.block_size)


def _dense_pairs(plan: SparsePlan, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hq) visible pairs of a dense prefill call."""
    if ctx.contiguous:
        counts = plan.layout_for(ctx, STATS_BLOCK).counts.sum((-1, -2), dtype=torch.float64)
        return counts[:, None].expand(ctx.batch, ctx.num_q_heads)
    return visible_keys(ctx).expand(ctx.batch, ctx.num_q_heads)

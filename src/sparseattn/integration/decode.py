"""A decode step's attention: the method's selection executed over the cache's pages (or dense
SDPA when it selects everything); records the pairs computed and visible."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..backends import cpp, dense_decode, gather_attend, reference_attend
from ..backends.gather import gather_pages_attend, selection_slots, visible_slots
from ..backends.sdpa import decode_key_mask, kernel_decode, window_matters
from ..cache import KVLayer, shared_state
from ..methods.static import Dense
from ..types import (
    AttentionContext,
    DecodeView,
    PageSelection,
    Phase,
    Selection,
    TokenSelection,
)
from .plan import DENSE, SparsePlan
from .stats import timed

if TYPE_CHECKING:
    from .execute import GroupCall


def run_decode(
    plan: SparsePlan,
    ctx: AttentionContext,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: KVLayer | None,
    part: GroupCall | None = None,
) -> torch.Tensor:
    method = plan.method_for(ctx, q, None if part is None else part.group)
    heads = None if part is None else (part.heads, part.num_heads)
    profile = plan.options.timing
    start = timed(ctx.device) if profile else 0.0
    selection, selected = None, start
    if not isinstance(method, Dense):
        view = _decode_view(plan, k, layer)
        selection = method.select_decode(q, view, ctx)
        selected = timed(ctx.device) if profile else 0.0
    all_visible = _all_visible(ctx, layer)
    visible = _decode_visible(ctx, all_visible)
    if selection is None:
        out = dense_decode(q, k, v, ctx, all_visible)
        computed, name = visible, DENSE.name
    else:
        out, computed = _run_selection(plan, ctx, q, k, v, selection, layer)
        name = method.name
    done = timed(ctx.device) if profile else 0.0
    plan.stats.record(
        ctx.layer_idx, ctx.phase, name, computed, visible, selected - start, done - selected, heads
    )
    return out


def dense_lane(
    plan: SparsePlan,
    layer_idx: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: object,
    window: int | None,
    scaling: float,
) -> torch.Tensor | None:
    """The lean decode step's attention where it is the plain dense case: (B, 1, Hq, Dv), or
    None where the general path must run.

    The same kernel call, stats and end of call as ``run_decode``'s dense branch, without the
    general path's context: taken when the setting decodes with ``dense`` and evicts nothing,
    the layer is a plain ``KVLayer`` (contiguous positions, every held key visible: no padding,
    no holes), the model's window hides nothing, and the C++ kernel runs these tensors. About
    15 us of Python a layer less (0.45 ms a step on SmolLM2's 30 layers, timed with the C++
    calls stubbed out).

    Args:
        q: (B, Hq, 1, D) this step's queries; k, v: (B, Hkv, Lk, D) what the layer holds, this
            step's key included (``update`` ran).
    """
    if type(plan.decode) is not Dense or plan.evict is not None or type(layer) is not KVLayer:
        return None
    seen = layer.seen
    if seen < 2 or layer.positions is not None or not layer.all_visible_at_decode():
        return None
    if window is not None and seen - 1 >= window:
        return None
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    if Hq // Hkv > cpp.PAGE_DECODE_ROWS or not (cpp.runs_on(q) and cpp.available()):
        return None
    profile = plan.options.timing
    start = timed(q.device) if profile else 0.0
    out = kernel_decode(q.reshape(B, Hkv, Hq // Hkv, D), k, v, scaling)
    done = timed(q.device) if profile else 0.0
    pairs = float(B * k.shape[2])
    plan.stats.record(layer_idx, Phase.DECODE, DENSE.name, pairs, pairs, 0.0, done - start)
    layer.finish_call()
    return out.view(B, 1, Hq, -1)


def _known_visible(ctx: AttentionContext, layer: KVLayer | None, selection: Selection) -> bool:
    """Whether every slot of a page selection is visible, decided without reading the device:
    grouped rows, all entries valid, pages inside the held keys of a layer whose every key the
    query sees (the page being written is the selection's tail)."""
    if isinstance(selection, TokenSelection):
        rows, whole = selection.indices.shape[1], True  # single slots: never past the keys
    else:
        rows, tail = selection.pages.shape[1], selection.tail
        whole = tail is not None and tail[1] == ctx.kv_len and tail[0] % selection.page_size == 0
        whole = whole or selection.page_size == 1
    return (
        selection.all_valid
        and whole
        and rows == ctx.num_kv_heads
        and ctx.contiguous
        and _all_visible(ctx, layer)
    )


def _all_visible(ctx: AttentionContext, layer: KVLayer | None) -> bool:
    """Whether the decode query sees every held key, decided without reading the device."""
    if layer is not None:
        return layer.all_visible_at_decode() and (layer.bounded or not window_matters(ctx))
    return ctx.contiguous and ctx.key_valid is None and not window_matters(ctx)


def _decode_visible(ctx: AttentionContext, all_visible: bool) -> torch.Tensor | float:
    """Visible pairs of a decode call: a host number when every key is visible."""
    if all_visible:
        return float(ctx.batch * ctx.kv_len)
    counts = decode_key_mask(ctx).sum(-1, dtype=torch.float64)[..., 0]  # (B, 1 or Hkv)
    counts = counts.repeat_interleave(ctx.groups, 1) if counts.shape[1] > 1 else counts
    return counts.expand(ctx.batch, ctx.num_q_heads)


def _decode_view(plan: SparsePlan, k: torch.Tensor, layer: KVLayer | None) -> DecodeView:
    counters = plan.stats.counters
    if layer is None:  # a cache we only read: no state survives the step
        return DecodeView(k, counters=counters)
    shared = shared_state(plan.cache) if plan.cache is not None else {}
    return DecodeView(
        k,
        layer.state,
        layer.writes,
        layer.last_write,
        layer.seen,
        shared,
        counters,
        layer.rewritten,
    )


def _run_selection(
    plan: SparsePlan,
    ctx: AttentionContext,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    layer: KVLayer | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Execute a decode selection; returns the output and the pairs computed: (B, Hq), or a
    host number per head (summed over rows) when every selected slot is known visible."""
    if isinstance(selection, TokenSelection) and _known_visible(ctx, layer, selection):
        selection = PageSelection(  # tokens are pages of one slot
            selection.indices, selection.valid, page_size=1, all_valid=True
        )
    if _known_visible(ctx, layer, selection) and plan.options.decode_backend == "gather":
        P, (start, stop) = selection.page_size, selection.tail or (0, 0)
        read = selection.pages.shape[-1] * P + stop - start
        return gather_pages_attend(q, k, v, selection, ctx), float(ctx.batch * read)
    slots, valid = selection_slots(selection)
    visible = visible_slots(slots, valid, ctx)  # (B, Hs, K)
    if plan.options.decode_backend == "reference":
        out = reference_attend(q, k, v, selection, ctx)
    else:  # k and v are views of the cache's buffer: pages are read from its storage
        out = gather_attend(q, k, v, selection, ctx, visible)
    computed = visible.sum(-1, dtype=torch.float64)  # (B, Hs)
    if computed.shape[1] != ctx.num_q_heads:
        computed = computed.repeat_interleave(ctx.groups, 1)
    return out, computed

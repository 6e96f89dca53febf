"""Per-call dispatch: which method runs, which backend executes it, what the cache keeps."""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ..backends import BlockLayout, dense_decode, dense_prefill, gather_attend, reference_attend
from ..backends.gather import gather_pages_attend, selection_slots, visible_slots
from ..backends.sdpa import decode_key_mask, visible_keys, window_matters
from ..backends.tiles import (
    PREFILL_BACKENDS,
    attend_tiles,
    density_once,
    select_once,
    tile_kernel,
)
from ..cache import (
    OUR_LAYERS,
    CacheLayer,
    HeadGroup,
    HeadGroupsLayer,
    KVLayer,
    SparseCache,
    adopt,
    build_layers,
    is_empty,
    shared_state,
)
from ..errors import UsageError
from ..methods.base import Method
from ..methods.eviction import EvictionPolicy
from ..methods.static import Dense
from ..types import (
    AttentionContext,
    BlockSelection,
    DecodeView,
    PageSelection,
    Phase,
    Selection,
    TokenSelection,
)
from ..compat import passed_cache
from .crossover import crossover, layout_key
from .stats import RunStats, timed

DECODE_BACKENDS = ("gather", "reference")
PAGE_SIZES = (8, 16, 32, 64, 128, 256)
_DENSE = Dense()
_STATS_BLOCK = 128
DECODE_MIN_LENGTH = 1024  # what min_length="auto" means for decode steps


@dataclass(frozen=True)
class HookOptions:
    """How ``sparse_attention`` runs, besides the methods themselves (validated on creation).

    Attributes:
        dense_layers: Layer indices that always attend densely.
        min_length: Calls whose key length is below this stay dense (sparse would be slower).
            "auto": a prompt chunk uses the crossover measured for its method (with its
            estimation), kernel, device, dtype and head layout (once per machine, cached; see
            ``integration/crossover.py``), a decode step ``DECODE_MIN_LENGTH``.
        prefill_backend: "auto" (the C++ kernel for float32 on the CPU, else FlexAttention),
            "cpp" (the C++ block-sparse kernel), "flex" (FlexAttention) or "reference" (dense
            fp32 oracle).
        decode_backend: "gather" (gather the selected pages, then SDPA) or "reference".
        page_size: Cache storage granularity in tokens (a page view of the cache is free).
        timing: Time selection and attention per layer (synchronizes; off by default).
    """

    dense_layers: frozenset[int] = frozenset()
    min_length: int | str = "auto"
    prefill_backend: str = "auto"
    decode_backend: str = "gather"
    page_size: int = 16
    timing: bool = False

    def __post_init__(self) -> None:
        if self.prefill_backend not in PREFILL_BACKENDS:
            raise UsageError(
                f"prefill_backend={self.prefill_backend!r}; allowed: {list(PREFILL_BACKENDS)}"
            )
        if self.decode_backend not in DECODE_BACKENDS:
            raise UsageError(
                f"decode_backend={self.decode_backend!r}; allowed: {list(DECODE_BACKENDS)}"
            )
        if self.page_size not in PAGE_SIZES:
            raise UsageError(f"page_size={self.page_size!r}; allowed: {list(PAGE_SIZES)}")
        if self.min_length == "auto":
            return
        bad = isinstance(self.min_length, bool) or not isinstance(self.min_length, int)
        if bad or self.min_length < 0:
            raise UsageError(f"min_length={self.min_length!r} must be an integer >= 0 or 'auto'")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sparse_attention`` (JSON-ready)."""
        return {
            "dense_layers": sorted(self.dense_layers),
            "min_length": self.min_length,
            "prefill_backend": self.prefill_backend,
            "decode_backend": self.decode_backend,
            "page_size": self.page_size,
            "timing": self.timing,
        }


@dataclass
class SparsePlan:
    """The active configuration of one model inside ``sparse_attention``."""

    model: nn.Module
    prefill: Method
    decode: Method
    evict: EvictionPolicy | None
    options: HookOptions
    stats: RunStats
    cache: Cache | None = None  # the cache of the forward running now
    _prepared: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    _layouts: dict = field(default_factory=dict, repr=False)

    # -- the cache -----------------------------------------------------------------------
    def make_layers(self) -> list[CacheLayer]:
        return build_layers(self.model, self.evict, self.options.page_size)

    def bind_cache(self, kwargs: dict[str, Any], config: Any, argument: str) -> None:
        """Forward pre-hook of the decoder: give every forward that caches our cache.

        No cache and ``use_cache``: a new ``SparseCache``. A ``DynamicCache`` (the one
        ``generate`` builds, or the user's): our layers in place, keeping what it holds. A
        ``SparseCache``: used. Any other cache: used as it is when nothing needs our layers,
        else refused with an error naming it. ``argument`` is the keyword the decoder's forward
        takes its cache under when the caller passed none (``cache`` or ``past_key_values``).
        """
        passed, cache = passed_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(config, "use_cache", True)
        if cache is None and use_cache:
            cache = SparseCache(layers=self.make_layers())
            kwargs[passed or argument] = cache
            self._prepared.add(cache)
        elif cache is not None and cache not in self._prepared:
            self._prepare(cache, kwargs.get("attention_mask"))
        self.cache = cache
        self.stats.bind_cache(cache)

    def _prepare(self, cache: Cache, attention_mask: torch.Tensor | None) -> None:
        ours = all(isinstance(layer, OUR_LAYERS) for layer in cache.layers) and cache.layers
        if not (ours or isinstance(cache, DynamicCache)):
            if self.evict is not None or getattr(self.decode, "needs_cache_state", False):
                raise UsageError(
                    f"{type(cache).__name__} cannot forget or keep decode state; "
                    f"evict={self.evict.name if self.evict else None!r} and decode="
                    f"{self.decode.name!r} need sparseattn's cache: pass no cache (or a "
                    "DynamicCache / SparseCache) so the library supplies its own"
                )
            self._prepared.add(cache)
            return
        if not is_empty(cache) and self.evict is not None and not self._built_here(cache):
            if self.evict.needs_queries:
                raise UsageError(
                    f"eviction policy {self.evict.name!r} scores the prompt with its queries, "
                    "but this cache was filled outside this sparse_attention block, so the "
                    "queries are gone; pass an empty cache (or none) and prefill inside it"
                )
        if is_empty(cache) or not self._built_here(cache):
            adopt(cache, self.make_layers(), attention_mask)
        self._prepared.add(cache)

    def _built_here(self, cache: Cache) -> bool:
        wanted = [layer.origin for layer in self.make_layers()]
        return [getattr(layer, "origin", None) for layer in cache.layers] == wanted

    def cache_layer(self, layer_idx: int, key: torch.Tensor) -> CacheLayer | None:
        """Our cache layer whose update produced ``key`` in this forward, or None."""
        if self.cache is None or layer_idx >= len(self.cache.layers):
            return None
        layer = self.cache.layers[layer_idx]
        if isinstance(layer, OUR_LAYERS) and layer.call_view() is not None:
            if layer.call_view()[0] is key:
                return layer
        return None

    # -- methods and layouts -------------------------------------------------------------
    def layout_for(self, ctx: AttentionContext, block_size: int) -> BlockLayout:
        """The BlockLayout of this call, shared by every layer of one forward pass.

        Layers of one forward see the same lengths, offsets and padding tensor; only the window
        differs between sliding and full layers. The padding tensor is held by the cache entry
        and compared by identity, so a later forward never reuses a stale layout.
        """
        key = (
            ctx.q_len,
            ctx.kv_len,
            ctx.q_offset,
            ctx.kv_offset,
            ctx.sliding_window,
            ctx.batch,
            block_size,
            ctx.device,
        )
        cached = self._layouts.get(key)
        if cached is not None and cached.ctx.key_valid is ctx.key_valid:
            return cached
        if len(self._layouts) > 8:
            self._layouts.clear()
        layout = self._layouts[key] = BlockLayout(ctx, block_size)
        return layout

    def min_length(self, ctx: AttentionContext, q: torch.Tensor, method: Method) -> int:
        """The shortest key length at which this call may run sparse."""
        if self.options.min_length != "auto":
            return self.options.min_length
        if not ctx.phase.is_prefill:
            return DECODE_MIN_LENGTH
        requested = self.options.prefill_backend
        kernel = tile_kernel("auto" if requested == "reference" else requested, q, ctx)
        return crossover(layout_key(kernel, q, ctx, method.block_size, method), method)

    def method_for(
        self, ctx: AttentionContext, q: torch.Tensor, group: HeadGroup | None = None
    ) -> Method:
        """The phase's method, or dense for kept-dense layers, short calls and unsupported phases.

        A head group may carry its own method for a phase (``group.prefill`` / ``.decode``).
        Sparse prefill methods estimate over contiguous key positions; a prompt chunk arriving
        at a layer that already evicted runs dense over what it kept.
        """
        method = self.prefill if ctx.phase.is_prefill else self.decode
        own = None if group is None else group.prefill if ctx.phase.is_prefill else group.decode
        method = own or method
        if isinstance(method, Dense):
            return method  # the setting's own dense (its tile size shapes a grouped prefill)
        if (
            ctx.layer_idx in self.options.dense_layers
            or ctx.kv_len < self.min_length(ctx, q, method)
            or not method.supports(ctx.phase)
            or (ctx.phase.is_prefill and not ctx.contiguous)
        ):
            return _DENSE
        return method


def phase_of(q_len: int, q_offset: int) -> Phase:
    """Prefill when the queries start the sequence, decode for one later query, else a chunk."""
    if q_offset == 0:
        return Phase.PREFILL
    return Phase.DECODE if q_len == 1 else Phase.CHUNKED_PREFILL


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
    )
    if phase is Phase.DECODE:
        out = _decode(plan, ctx, query, key, value, layer, part)
    else:
        out = _prefill(plan, ctx, query, key, value, layer, part)
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


def _prefill(
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
    product; over explicit positions (a layer that evicted) they run as masked SDPA over what
    the layer kept. The first prompt of a layer split into head groups runs as one selection
    in which each group with a prefill method of its own has that method's tiles.
    """
    method = plan.method_for(ctx, q, None if part is None else part.group)
    patterns = _group_patterns(plan, ctx, q, layer)
    heads = None if part is None else (part.heads, part.num_heads)
    profile = plan.options.timing
    start = timed(ctx.device) if profile else 0.0
    dense = isinstance(method, Dense) and not patterns
    if dense and not ctx.contiguous:
        out = (
            dense_prefill(q, k, v, ctx)
            if ctx.softcap is None
            else reference_attend(q, k, v, None, ctx)
        )
    elif dense and ctx.softcap is None and not window_matters(ctx):
        out = dense_prefill(q, k, v, ctx)
    else:
        layout = plan.layout_for(ctx, method.block_size)
        selection = select_once(method, q, k, ctx, layout)
        if patterns:
            selection = _merge_patterns(selection, patterns, q, k, ctx, layout)
        selected = timed(ctx.device) if profile else 0.0
        out = attend_tiles(plan.options.prefill_backend, q, k, v, selection, ctx, layout)
        done = timed(ctx.device) if profile else 0.0
        computed, visible = density_once(layout, selection)
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
        counts = plan.layout_for(ctx, _STATS_BLOCK).counts.sum((-1, -2), dtype=torch.float64)
        return counts[:, None].expand(ctx.batch, ctx.num_q_heads)
    return visible_keys(ctx).expand(ctx.batch, ctx.num_q_heads)


def _decode(
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
        computed, name = visible, _DENSE.name
    else:
        out, computed = _run_selection(plan, ctx, q, k, v, selection, layer)
        name = method.name
    done = timed(ctx.device) if profile else 0.0
    plan.stats.record(
        ctx.layer_idx, ctx.phase, name, computed, visible, selected - start, done - selected, heads
    )
    return out


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

"""The active configuration of one model inside ``sparse_attention``, and the choice of the
method each attention call runs (the phase's method, or dense)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..backends import BlockLayout
from ..backends.tiles import tile_kernel
from ..cache import HeadGroup
from ..methods.base import Method
from ..methods.eviction import EvictionPolicy
from ..methods.static import Dense
from ..types import AttentionContext, Phase
from .binding import CacheBinding
from .crossover import crossover, layout_key
from .options import DECODE_MIN_LENGTH, HookOptions
from .stats import RunStats

DENSE = Dense()


@dataclass
class SparsePlan(CacheBinding):
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
            return DENSE
        return method


def phase_of(q_len: int, q_offset: int) -> Phase:
    """Prefill when the queries start the sequence, decode for one later query, else a chunk."""
    if q_offset == 0:
        return Phase.PREFILL
    return Phase.DECODE if q_len == 1 else Phase.CHUNKED_PREFILL

"""Per-call dispatch: which method runs, which backend executes it, what gets recorded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backends import BlockLayout, flex_attend, gather_attend, reference_attend
from ..backends.masks import base_token_mask
from ..methods.base import Method
from ..methods.static import Dense
from ..types import AttentionContext, Phase
from .stats import RunStats, Stopwatch

PREFILL_BACKENDS = ("flex", "reference")
DECODE_BACKENDS = ("gather", "flex", "reference")
_DENSE = Dense()
_STATS_BLOCK = 128


@dataclass
class SparsePlan:
    """The active configuration of one model inside ``sparse_attention``."""

    prefill: Method
    decode: Method
    dense_layers: frozenset[int]
    min_length: int
    prefill_backend: str
    decode_backend: str
    stats: RunStats
    _layouts: dict = field(default_factory=dict, repr=False)

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
        )
        cached = self._layouts.get(key)
        if cached is not None and cached.ctx.key_valid is ctx.key_valid:
            return cached
        if len(self._layouts) > 8:
            self._layouts.clear()
        layout = self._layouts[key] = BlockLayout(ctx, block_size)
        return layout

    def __post_init__(self) -> None:
        if self.prefill_backend not in PREFILL_BACKENDS:
            raise ValueError(
                f"prefill_backend={self.prefill_backend!r}; allowed: {list(PREFILL_BACKENDS)}"
            )
        if self.decode_backend not in DECODE_BACKENDS:
            raise ValueError(
                f"decode_backend={self.decode_backend!r}; allowed: {list(DECODE_BACKENDS)}"
            )

    def method_for(self, ctx: AttentionContext) -> Method:
        """The phase's method, or dense for kept-dense layers, short calls and unsupported phases."""
        method = self.prefill if ctx.phase.is_prefill else self.decode
        if (
            ctx.layer_idx in self.dense_layers
            or ctx.kv_len < self.min_length
            or not method.supports(ctx.phase)
        ):
            return _DENSE
        return method


def phase_of(q_len: int, q_offset: int) -> Phase:
    """Prefill when the queries start the sequence, decode for one later query, else a chunk."""
    if q_offset == 0:
        return Phase.PREFILL
    return Phase.DECODE if q_len == 1 else Phase.CHUNKED_PREFILL


def window_matters(ctx: AttentionContext) -> bool:
    """True when the layer's own sliding window hides some key from some query."""
    if ctx.sliding_window is None:
        return False
    return ctx.q_offset + ctx.q_len - 1 - ctx.kv_offset >= ctx.sliding_window


def dense_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
) -> torch.Tensor:
    """The model's own dense attention through SDPA (no window): (B, Lq, Hq, D)."""
    gqa = ctx.groups > 1
    aligned = ctx.q_offset + ctx.q_len == ctx.kv_offset + ctx.kv_len
    if ctx.key_valid is None and aligned and ctx.q_len == 1:
        out = F.scaled_dot_product_attention(q, k, v, scale=ctx.scaling, enable_gqa=gqa)
    elif ctx.key_valid is None and aligned and ctx.q_len == ctx.kv_len:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=ctx.scaling, enable_gqa=gqa
        )
    else:
        mask = base_token_mask(ctx)  # (B, 1, Lq, Lk)
        mask = mask | ~mask.any(-1, keepdim=True)  # padded query rows: finite garbage, never NaN
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=ctx.scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2)


def run_layer(
    plan: SparsePlan,
    *,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_offset: int,
    kv_offset: int,
    key_valid: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Select, execute and record one attention call. Returns (B, Lq, Hq, D)."""
    B, Hq, Lq, _ = query.shape
    ctx = AttentionContext(
        layer_idx=layer_idx,
        phase=phase_of(Lq, q_offset),
        batch=B,
        q_len=Lq,
        kv_len=key.shape[2],
        q_offset=q_offset,
        kv_offset=kv_offset,
        num_q_heads=Hq,
        num_kv_heads=key.shape[1],
        scaling=scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        key_valid=key_valid,
        device=query.device,
    )
    method = plan.method_for(ctx)
    clock = Stopwatch(query.device)
    if isinstance(method, Dense) and not window_matters(ctx) and softcap is None:
        start = clock.now()
        out = dense_sdpa(query, key, value, ctx)
        visible = (
            plan.layout_for(ctx, _STATS_BLOCK).counts.sum((-1, -2)).double()[:, None].expand(B, Hq)
        )
        plan.stats.record(
            layer_idx, ctx.phase, method.name, visible, visible, 0.0, clock.now() - start
        )
        return out

    start = clock.now()
    layout = plan.layout_for(ctx, method.block_size)
    selection = method.select(query, key, ctx, layout)
    selected = clock.now()
    backend = plan.prefill_backend if ctx.phase.is_prefill else plan.decode_backend
    if backend == "reference":
        out = reference_attend(query, key, value, selection, ctx)
    elif backend == "gather" and Lq == 1:
        out = gather_attend(query, key, value, selection, ctx)
    else:
        out = flex_attend(query, key, value, selection, ctx, layout)
    done = clock.now()
    computed, visible = layout.density(selection)
    plan.stats.record(
        layer_idx, ctx.phase, method.name, computed, visible, selected - start, done - selected
    )
    return out

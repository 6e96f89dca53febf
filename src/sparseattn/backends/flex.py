"""Block-sparse execution with FlexAttention.

The BlockMask is built straight from the selection's tiles (``BlockMask.from_kv_blocks``): tiles
whose every pair is visible run as *full* blocks with no mask evaluation, the rest (diagonal,
window edges, padding, ragged ends) as *partial* blocks whose ``mask_mod`` applies causality,
the layer's window and padding at token level. The kernel is compiled once per (batch, heads, head
size) with symbolic lengths (inductor C++ on CPU, Triton on CUDA); offsets, window and padding
are tensors captured by the mask function, so new lengths or offsets do not trigger a recompile.
A static selection (a pattern of the call shape only) builds its BlockMask once per layout: the
layers of one forward share it.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..types import AttentionContext, BlockSelection
from .masks import BlockLayout

_NO_WINDOW = 2**62
# graphs the compiled kernel may hold: one per (batch, heads, head size) seen, lengths symbolic
_RECOMPILE_LIMIT = 64
_compiled = None
_FROM_KV_ACCEPTS_Q_BLOCKS = (
    "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
)
_COMPILE_TAKES_RECOMPILE_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


def compile_enabled() -> bool:
    """Compiled kernels unless SPARSEATTN_FLEX_COMPILE=0 (eager flex: slow, for debugging)."""
    return os.environ.get("SPARSEATTN_FLEX_COMPILE", "1") != "0"


def _flex_fn():
    """flex_attention, compiled once with a recompile limit of its own.

    The limit applies to this compiled function only; dynamo's process-wide limit is never
    changed (on a torch whose ``torch.compile`` has no ``recompile_limit``, it is raised only for
    the duration of each call).
    """
    global _compiled
    if not compile_enabled():
        return flex_attention
    if _compiled is None:
        import torch._dynamo

        limit = max(torch._dynamo.config.cache_size_limit, _RECOMPILE_LIMIT)
        if _COMPILE_TAKES_RECOMPILE_LIMIT:
            _compiled = torch.compile(flex_attention, dynamic=True, recompile_limit=limit)
        else:
            _compiled = _with_recompile_limit(torch.compile(flex_attention, dynamic=True), limit)
    return _compiled


def _with_recompile_limit(fn, limit: int):
    """``fn`` run with dynamo's recompile limit at ``limit``, restored when the call returns."""

    def call(*args, **kwargs):
        with torch._dynamo.config.patch(cache_size_limit=limit):
            return fn(*args, **kwargs)

    return call


def _mark_static(t: torch.Tensor, *dims: int) -> None:
    """Compile these sizes of ``t`` as constants (lengths stay symbolic).

    Only sequence lengths are symbolic in the compiled kernel; batch, heads and head size are
    constants (a new batch size compiles one more graph). With every size symbolic, a graph first
    compiled for batch 1 and recompiled for a larger batch carries enough size symbols to hit an
    inductor code-generation failure in the CPU kernel (torch 2.13).
    """
    if compile_enabled():
        for dim in dims:
            torch._dynamo.mark_static(t, dim)


def _ordered_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nQ, nK) bool -> counts (B, H, nQ) int32 and indices with chosen tiles first."""
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # chosen first, in order
    return counts, order.to(torch.int32)


def build_block_mask(
    selection: BlockSelection, ctx: AttentionContext, layout: BlockLayout
) -> BlockMask:
    """FlexAttention BlockMask for a selection, full and partial tiles separated."""
    sel = selection.mask  # (B, H, nQ, nK)
    full = sel & layout.full[:, None]
    partial = sel & ~full
    kv_num, kv_idx = _ordered_indices(partial)
    full_num, full_idx = _ordered_indices(full)

    dev = ctx.device
    q_off = torch.tensor(ctx.q_offset, device=dev)
    kv_off = torch.tensor(ctx.kv_offset, device=dev)
    window = torch.tensor(ctx.sliding_window or _NO_WINDOW, device=dev)
    if ctx.key_valid is not None:
        key_valid = ctx.key_valid
    else:
        key_valid = torch.ones(ctx.batch, ctx.kv_len, dtype=torch.bool, device=dev)

    def visible(b, h, q_idx, kv_idx):
        q_pos = q_idx + q_off
        k_pos = kv_idx + kv_off
        return (k_pos <= q_pos) & (q_pos - k_pos < window) & key_valid[b, kv_idx]

    for t in (kv_num, kv_idx, full_num, full_idx):
        _mark_static(t, 0, 1)  # (B, H, nQ[, nK])
    _mark_static(key_valid, 0)  # (B, Lk)
    extra = {"compute_q_blocks": False} if _FROM_KV_ACCEPTS_Q_BLOCKS else {}
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=selection.block_size,
        mask_mod=visible,
        seq_lengths=(ctx.q_len, ctx.kv_len),
        **extra,
    )


def _block_mask(selection: BlockSelection, ctx: AttentionContext, layout: BlockLayout) -> BlockMask:
    """The selection's BlockMask; a static selection's is built once per layout and reused."""
    if not selection.static:
        return build_block_mask(selection, ctx, layout)
    key = ("flex_block_mask", id(selection))
    cached = layout.shared.get(key)
    if cached is None or cached[0] is not selection:
        cached = layout.shared[key] = (selection, build_block_mask(selection, ctx, layout))
    return cached[1]


def flex_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    ctx: AttentionContext,
    layout: BlockLayout | None = None,
) -> torch.Tensor:
    """Run the selected tiles with FlexAttention.

    Args:
        q: (B, Hq, Lq, D).
        k: (B, Hkv, Lk, D).
        v: (B, Hkv, Lk, D).
        selection: Tiles to compute (already finalized: diagonal kept, invisible tiles dropped).
        ctx: The call's context.
        layout: The BlockLayout of ``selection.block_size`` if the caller already has it.

    Returns:
        (B, Lq, Hq, D). Rows with no visible key are zero.
    """
    layout = layout or BlockLayout(ctx, selection.block_size)
    block_mask = _block_mask(selection, ctx, layout)
    score_mod = None
    if ctx.softcap is not None:
        cap = torch.tensor(ctx.softcap, device=ctx.device, dtype=torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / cap) * cap

    for t in (q, k, v):
        _mark_static(t, 0, 1, 3)  # (B, H, L, D)
    out = _flex_fn()(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=ctx.scaling,
        enable_gqa=ctx.groups > 1,
    )  # (B, Hq, Lq, D)
    return out.transpose(1, 2)

"""PBS-Attn: keys permuted inside segments so heavy keys share tiles, then block selection."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..backends.masks import BlockLayout, num_blocks, row_starts
from ..errors import UsageError
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, PrefillCall, knob
from .common import row_sink_tiles
from .estimators import grouped_scores, keep_cumulative_mass, last_query_probs, pool_blocks

SEGMENTS = (64, 128, 256, 512, 1024, 2048)


def segment_key_order(
    q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, segment: int, n_last: int
) -> torch.Tensor:
    """(B, Hkv, Lk) long: the key index at each slot once every full segment is sorted.

    Keys are ranked inside each full segment of ``segment`` keys by their attention from the
    last ``n_last`` queries, averaged over those queries and the KV head's query heads (one
    order per KV head, so the keys are never copied per query head); the tail past the last
    full segment keeps its order. Padding ranks below every real key, so every KV head puts a
    row's padding in the same slots.
    """
    B, Hkv, Lk, _ = k.shape
    probs = last_query_probs(q, k, ctx, n_last)  # (B, Hq, n, Lk)
    importance = probs.view(B, Hkv, -1, Lk).mean(2)  # (B, Hkv, Lk): group and queries pooled
    if ctx.key_valid is not None:
        importance = importance.masked_fill(~ctx.key_valid[:, None], -1.0)
    order = torch.arange(Lk, device=k.device).expand(B, Hkv, Lk).clone()
    full = Lk // segment * segment
    if full:
        ranked = importance[..., :full].view(B, Hkv, -1, segment)  # (B, Hkv, nS, S)
        within = ranked.argsort(dim=-1, descending=True, stable=True)
        start = torch.arange(0, full, segment, device=k.device)[:, None]  # (nS, 1)
        order[..., :full] = (within + start).view(B, Hkv, full)
    return order


def far_tiles(ctx: AttentionContext, layout: BlockLayout, segment: int) -> torch.Tensor:
    """(nQ, nK) bool: key tile j lies in a full segment that ends before query tile i starts.

    Every query of tile i sees every key of such a segment whatever their order, so these are
    the tiles whose keys may be permuted; the others (the query tile's own segments) are read
    in their original order.
    """
    b, dev = layout.block_size, ctx.device
    nK = layout.n_kv_blocks
    seg = torch.arange(nK, device=dev) * b // segment  # (nK,) segment of each key tile
    seg_last = ctx.kv_offset + (seg + 1) * segment - 1  # absolute position of its last key
    full = (seg + 1) * segment <= ctx.kv_len
    q_first = torch.arange(layout.n_q_blocks, device=dev) * b + ctx.q_offset  # (nQ,)
    return (seg_last[None, :] < q_first[:, None]) & full[None, :]


def _pooled(
    x: torch.Tensor, valid: torch.Tensor | None, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) -> (B, H, nB, D) means over each tile's real keys; (B, 1, nB) tile has one."""
    B, _, L, _ = x.shape
    if valid is None:
        return pool_blocks(x, L, b), torch.ones(
            B, 1, num_blocks(L, b), dtype=torch.bool, device=x.device
        )
    n = num_blocks(L, b)
    w = F.pad(valid[:, None].float(), (0, n * b - L))  # (B, 1, n b)
    sums = F.pad(x.float(), (0, 0, 0, n * b - L)).mul(w[..., None])
    sums = sums.view(*x.shape[:2], n, b, -1).sum(3)  # (B, H, n, D)
    counts = w.view(B, 1, n, b).sum(-1)  # (B, 1, n)
    return sums / counts.clamp_min(1.0)[..., None], counts > 0


def keep_with_forced(
    probs: torch.Tensor, forced: torch.Tensor, allowed: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Forced tiles, then the fewest other allowed tiles until the row holds ``threshold``.

    Args:
        probs: (..., n) estimated mass per tile (rows sum to 1 over allowed tiles).
        forced: (..., n) bool, always kept (their mass counts toward the threshold).
        allowed: (..., n) bool, tiles that may be kept.
    """
    if threshold >= 1.0:
        return (allowed | forced).expand_as(probs)
    forced_mass = (probs * forced).sum(-1, keepdim=True)
    rest = probs * (allowed & ~forced)
    rest_total = rest.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    needed = (threshold - forced_mass) / rest_total  # share of the rest still to reach
    return forced | keep_cumulative_mass(rest, needed)


@register_method
@dataclass
class PBSAttention(Method):
    """PBS-Attn (Wang et al., 2025, arXiv:2510.21270): permuted block-sparse attention.

    Keys are sorted inside each full segment of ``segment`` keys by the attention of the last
    query tile (Eq. 7-8, one order per KV head), so the keys most queries attend to share a few
    tiles; tiles are then chosen by mean pooling (App. D.1): pooled queries against pooled
    (permuted) keys, softmax over the allowed tiles, and the fewest tiles reaching
    ``threshold`` of the mass per query tile, the query tile's own segments (the paper's
    on-diagonal segments) always kept, as is the first permuted tile (the heaviest keys of the
    first segment, where the attention sink lands).

    Causality at segment granularity: a segment is permuted for a query tile only where it ends
    before the tile's first query, so every key of it is visible to every query of the tile in
    any order. The kernel runs one extended call (``rearrange``): the permuted keys, padded to
    whole tiles, sit before the original keys at positions earlier than every query; each
    query tile reads its earlier segments from the permuted copy and its own segments from the
    original copy, causally masked as usual, so each pair is computed once and the output is
    exact with every tile kept (queries are not permuted: the paper's Sec. 4.3 found no gain,
    so no inverse permutation is needed). The copy doubles K and V for the call.

    Choices: one permutation per KV head, shared by its query heads (the paper's App. G
    variant; the default replicates K per query head); padding sorts last in its segment;
    pooled keys average a tile's real keys only. Calls with a sliding window or a key bias,
    and ``permute=False``, run the same selection on the original order (the paper's
    MeanPooling baseline, its first tile and diagonal kept). ``select`` alone returns the
    original-order tiles holding every pair the permuted run computes (a superset of its work).
    """

    name: ClassVar[str] = "pbs"
    paper: ClassVar[str] = "Sparser Block-Sparse Attention via Token Permutation (arXiv:2510.21270)"
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"threshold": 1.0}
    default_grid: ClassVar[dict] = {"threshold": [0.8, 0.9, 0.95]}

    threshold: float = knob(
        0.9, low=0.01, high=1.0, help="estimated mass each query tile keeps (1 = dense)"
    )
    segment: int = knob(
        256, choices=SEGMENTS, help="segment S in tokens inside which keys are permuted"
    )
    permute: bool = knob(
        True, choices=(True, False), help="False: the same selection without the permutation"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segment % self.block_size:
            allowed = [s for s in SEGMENTS if s % self.block_size == 0]
            raise UsageError(
                f"pbs: segment={self.segment} must be a multiple of block_size="
                f"{self.block_size}; allowed segments: {allowed}"
            )

    def _permutes(self, ctx: AttentionContext) -> bool:
        return self.permute and ctx.sliding_window is None and ctx.key_bias is None

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        if not self._permutes(ctx):
            return layout.finalize(self._plain_tiles(q, k, ctx, layout))
        order, _, far, near = self._extended_tiles(q, k, ctx, layout)
        B, Hq, nQ, nK = near.shape
        b, Hkv = layout.block_size, ctx.num_kv_heads
        # which original tile each permuted slot's key comes from (slots past Lk: a spare column)
        source = F.pad(order // b, (0, nK * b - ctx.kv_len), value=nK)  # (B, Hkv, nK b)
        holds = torch.zeros(B, Hkv, nK, nK + 1, device=ctx.device)
        holds.scatter_(-1, source.view(B, Hkv, nK, b), 1.0)  # permuted tile -> original tiles
        rows = far.float().reshape(B, Hkv, -1, nK)  # (B, Hkv, g nQ, nK)
        reached = torch.matmul(rows, holds[..., :nK]).view(B, Hq, nQ, nK) > 0
        return layout.finalize(reached | near)

    def rearrange(self, q, k, v, ctx: AttentionContext, layout: BlockLayout) -> PrefillCall | None:
        if not self._permutes(ctx) or not far_tiles(ctx, layout, self.segment).any():
            return None
        order, slots_valid, far, near = self._extended_tiles(q, k, ctx, layout)
        b, nK = layout.block_size, layout.n_kv_blocks
        pad = nK * b - ctx.kv_len

        def extended(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, nK b + Lk, D)
            permuted = x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))
            return torch.cat([F.pad(permuted, (0, 0, 0, pad)), x], 2)

        key_valid = None
        if ctx.key_valid is not None or pad:
            original = ctx.key_valid if ctx.key_valid is not None else torch.ones_like(slots_valid)
            key_valid = torch.cat([F.pad(slots_valid, (0, pad), value=False), original], -1)
        run_ctx = dataclasses.replace(
            ctx,
            kv_len=nK * b + ctx.kv_len,
            kv_offset=ctx.kv_offset - nK * b,
            key_valid=key_valid,
            row_start=row_starts(ctx),
        )
        run_layout = BlockLayout(run_ctx, b)
        selection = run_layout.finalize(torch.cat([far, near], -1))
        return PrefillCall(extended(k), extended(v), run_ctx, run_layout, selection)

    def _extended_tiles(self, q, k, ctx: AttentionContext, layout: BlockLayout):
        """The permutation and the tiles of the extended call.

        Returns:
            order: (B, Hkv, Lk) key index at each permuted slot.
            slots_valid: (B, Lk) bool, the permuted slots holding real keys (alike in every head).
            far: (B, Hq, nQ, nK) bool, permuted tiles kept.
            near: (B, Hq, nQ, nK) bool, original tiles kept (the query tile's own segments).
        """
        b = layout.block_size
        order = segment_key_order(q, k, ctx, self.segment, n_last=b)
        if ctx.key_valid is None:
            slots_valid = torch.ones(ctx.batch, ctx.kv_len, dtype=torch.bool, device=ctx.device)
        else:
            slots_valid = ctx.key_valid.gather(1, order[:, 0])
        permuted = k.gather(2, order[..., None].expand(-1, -1, -1, k.shape[-1]))
        far_keys, far_real = _pooled(permuted, slots_valid, b)  # (B, Hkv, nK, D), (B, 1, nK)
        near_keys, _ = _pooled(k, ctx.key_valid, b)
        pooled_q = pool_blocks(q, ctx.q_len, b)  # (B, Hq, nQ, D)
        scores = grouped_scores(pooled_q, torch.cat([far_keys, near_keys], 2)) * ctx.scaling
        far = far_tiles(ctx, layout, self.segment)  # (nQ, nK)
        far_ok = far[None] & far_real  # (B, nQ, nK)
        near_ok = ~far[None] & layout.visible  # (B, nQ, nK)
        allowed = torch.cat([far_ok, near_ok], -1)[:, None]  # (B, 1, nQ, 2 nK)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        forced = torch.zeros_like(allowed)
        forced[..., layout.n_kv_blocks :] = near_ok[:, None]
        forced[..., 0] = far_ok[:, None, :, 0]  # first permuted tile: the sink's segment
        keep = keep_with_forced(probs, forced, allowed, self.threshold)  # (B, Hq, nQ, 2 nK)
        nK = layout.n_kv_blocks
        return order, slots_valid, keep[..., :nK], keep[..., nK:]

    def _plain_tiles(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> torch.Tensor:
        """(B, Hq, nQ, nK) the same selection on the original order (MeanPooling)."""
        keys, _ = _pooled(k, ctx.key_valid, layout.block_size)
        pooled_q = pool_blocks(q, ctx.q_len, layout.block_size)
        scores = grouped_scores(pooled_q, keys) * ctx.scaling  # (B, Hq, nQ, nK)
        allowed = layout.visible[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        forced = (layout.diagonal[None] | row_sink_tiles(layout, 1))[:, None] & allowed
        return keep_with_forced(probs, forced, allowed, self.threshold)

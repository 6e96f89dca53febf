"""SALE: element-wise attention estimate from 4-bit quantised Q and K, tiles kept by a relative
attention score against the exact sink and local scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, base_token_mask
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .common import row_sink_tiles, window_tiles
from .estimators import grouped_scores

_SCORE_ELEMENTS = 1 << 24  # estimated scores held at once (64 MiB of float32)


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantisation: x ~ codes * scale.

    Args:
        x: (..., D) float vectors, one per token.
        bits: Code width; codes lie in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (7 for 4 bits).

    Returns:
        codes: (..., D) int8 round-to-nearest of x / scale.
        scale: (..., 1) float max |x| / (2^(bits-1) - 1) (0 for a zero vector).
    """
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / levels
    codes = torch.round(x / scale.clamp_min(torch.finfo(x.dtype).tiny)).clamp_(-levels, levels)
    return codes.to(torch.int8), scale


def _capped(z: torch.Tensor, ctx: AttentionContext, columns: torch.Tensor) -> torch.Tensor:
    """Scaled logits (B, Hq, n, len(columns)) -> the model's: soft cap, then key bias."""
    if ctx.softcap is not None:
        z = torch.tanh(z / ctx.softcap) * ctx.softcap
    if ctx.key_bias is not None:
        z = z + ctx.key_bias[:, :, None, columns].float()
    return z


@register_method
@dataclass
class SALE(Method):
    """SALE (Ji et al., 2025, arXiv:2505.24179): low-bit estimation for sparse prefill.

    Queries and keys are smoothed (each head's mean query, each KV head's mean key subtracted),
    quantised per token to ``bits`` (4 in the paper) and multiplied as integer codes; the
    smoothed-away term q_mean . k is added back exactly, so the estimate approximates
    q . (k - k_mean), which differs from the logit by a per-query constant. The first valid
    tile of each row (sink) and the tiles within ``local`` tokens of the diagonal are always
    computed, exactly; their logits give each query its reference max m and sum l. A key's
    relative attention score is exp(z_est - m) / l, its weight relative to the sink and local
    region; a tile is kept when any of its (query, key) pairs scores >= ``threshold``
    (Sec. 3 of the paper).
    Choices where the paper is open or that differ from it: square tiles of ``block_size``
    (the paper: 64 queries x 32 keys); one threshold for every head (the paper calibrates one
    per head offline); per-token scales (its per-token mode); the dequantised codes are
    multiplied in float32 (the int4 products up to float rounding, without their speed: on a
    CPU the estimate costs about as much as the causal half of Q K^T, so SALE measures the
    paper's selection, not its kernel).
    """

    name: ClassVar[str] = "sale"
    paper: ClassVar[str] = (
        "SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM "
        "Prefilling (arXiv:2505.24179)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"threshold": 0.0}
    default_grid: ClassVar[dict] = {"threshold": [0.002, 0.004, 0.008]}

    threshold: float = knob(
        0.004,
        low=0.0,
        high=1.0,
        help="relative attention score (vs sink + local) a pair needs to keep its tile; 0 = dense",
    )
    local: int = knob(128, low=1, high=1 << 20, help="tokens before each query always computed")
    bits: int = knob(4, choices=(4, 8), help="code width of the quantised Q and K")

    def reference_tiles(self, layout: BlockLayout) -> torch.Tensor:
        """(B or 1, nQ, nK) bool: the sink, local and diagonal tiles, computed exactly."""
        local = window_tiles(layout, self.local) | layout.diagonal
        return row_sink_tiles(layout, 1) | local[None]

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        B, Hq, Lq, _ = q.shape
        if self.threshold <= 0.0:
            return layout.every_tile(Hq)
        b, dev = layout.block_size, ctx.device
        nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
        q32 = q.float()
        q_mean = q32.mean(2, keepdim=True)  # (B, Hq, 1, D)
        k_smooth = k.float()
        k_smooth = k_smooth - k_smooth.mean(2, keepdim=True)  # (B, Hkv, Lk, D)
        q_codes, q_scale = quantize_per_token(q32 - q_mean, self.bits)  # (B, Hq, Lq, D|1)
        k_codes, k_scale = quantize_per_token(k_smooth, self.bits)  # (B, Hkv, Lk, D|1)
        # codes times their scales: the products equal the integer products, rescaled
        q_est = q_codes.float().mul_(q_scale * ctx.scaling)  # (B, Hq, Lq, D)
        k_est = k_codes.float().mul_(k_scale)  # (B, Hkv, Lk, D)
        mean_term = grouped_scores(q_mean, k_smooth) * ctx.scaling  # (B, Hq, 1, Lk), exact
        reference = self.reference_tiles(layout)  # (B or 1, nQ, nK)
        hits = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool, device=dev)
        # the estimate is held for at most _SCORE_ELEMENTS pairs: query tiles x key tiles
        row_tiles = max(1, _SCORE_ELEMENTS // max(1, B * Hq * ctx.kv_len * b))
        col_tiles = max(1, _SCORE_ELEMENTS // (B * Hq * row_tiles * b * b))
        for t0 in range(0, nQ, row_tiles):
            t1 = min(nQ, t0 + row_tiles)
            r0, r1 = t0 * b, min(t1 * b, Lq)
            # causal: these queries see no key tile past the last one's position
            seen = min(nK, max(0, (ctx.q_offset + r1 - 1 - ctx.kv_offset) // b + 1))
            if seen == 0:
                continue
            threshold = self._reference_threshold(
                q32[:, :, r0:r1], k_smooth, ctx, layout, reference[:, t0:t1], r0, r1
            )  # (B, Hq, c, 1)
            visible = base_token_mask(ctx, r0, r1)  # (B, 1, c, Lk)
            for s0 in range(0, seen, col_tiles):
                s1 = min(seen, s0 + col_tiles)
                lo, hi = s0 * b, min(s1 * b, ctx.kv_len)
                z = grouped_scores(q_est[:, :, r0:r1], k_est[:, :, lo:hi])  # (B, Hq, c, hi-lo)
                z = _capped(z.add_(mean_term[..., lo:hi]), ctx, torch.arange(lo, hi, device=dev))
                margin = z.sub_(threshold).masked_fill_(~visible[..., lo:hi], float("-inf"))
                pad = (0, (s1 - s0) * b - (hi - lo), 0, (t1 - t0) * b - (r1 - r0))
                if any(pad):
                    margin = torch.nn.functional.pad(margin, pad, value=float("-inf"))
                margin = margin.view(B, Hq, t1 - t0, b, s1 - s0, b).amax(-1).amax(3)
                hits[:, :, t0:t1, s0:s1] = margin >= 0  # some pair reaches the threshold
        return layout.finalize(hits | reference[:, None])

    def _reference_threshold(
        self,
        q: torch.Tensor,
        k_smooth: torch.Tensor,
        ctx: AttentionContext,
        layout: BlockLayout,
        reference: torch.Tensor,
        r0: int,
        r1: int,
    ) -> torch.Tensor:
        """(B, Hq, c, 1): the logit at which a key's relative score reaches the threshold.

        Exact logits of queries [r0, r1) over the keys of their reference tiles give each query
        m (max) and l (sum of exp(z - m)); exp(z - m) / l >= threshold iff
        z >= m + log(threshold * l). A query with no reference key (padding) gets +inf.

        Args:
            q: (B, Hq, c, D) float32 queries [r0, r1).
            k_smooth: (B, Hkv, Lk, D) float32 smoothed keys.
            reference: (B or 1, t, nK) bool reference tiles of the queries' tiles.
        """
        b, dev = layout.block_size, ctx.device
        c = r1 - r0
        tiles = reference.any(0).any(0).nonzero().flatten()  # (nU,) key tiles any row needs
        columns = (tiles[:, None] * b + torch.arange(b, device=dev)).flatten()  # (nU b,)
        inside = columns < ctx.kv_len
        columns = columns.clamp(max=ctx.kv_len - 1)
        z = grouped_scores(q, k_smooth.index_select(2, columns)) * ctx.scaling
        z = _capped(z, ctx, columns)  # (B, Hq, c, nU b) exact logits
        own = reference[:, :, tiles].repeat_interleave(b, 1)[:, :c].repeat_interleave(b, 2)
        keep = base_token_mask(ctx, r0, r1)[..., columns] & (own & inside)[:, None]
        z = z.masked_fill(~keep, float("-inf"))  # (B, Hq, c, nU b)
        top = z.amax(-1, keepdim=True)
        top = torch.where(top > float("-inf"), top, 0.0)
        total = (z - top).exp().sum(-1, keepdim=True)  # (B, Hq, c, 1)
        level = top + torch.log(self.threshold * total)
        return torch.where(total > 0, level, float("inf"))

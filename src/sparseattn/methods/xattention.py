"""XAttention: block importance from strided antidiagonal sums, cumulative-threshold selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backends.masks import BlockLayout
from ..errors import UsageError
from ..profiles import bind_profile, open_profile
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .estimators import keep_cumulative_mass

# query groups scored at once: memory O(chunk x Lk / S); later key groups are skipped
_GROUP_CHUNK = 512


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim -2 of (B, H, L, D) to ``length``."""
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[-2]))


def antidiagonal_tile_scores(
    q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, layout: BlockLayout, stride: int
) -> torch.Tensor:
    """(B, Hq, nQ, nK) float32 estimated attention mass per tile, rows summing to 1.

    Each group of ``stride`` queries, taken in reverse order, is dotted with each group of
    ``stride`` keys: the sum of one antidiagonal of every stride x stride sub-tile. A softmax
    over key groups (causal, window and padding applied at group level) turns these into a
    (L/S) x (L/S) attention estimate, summed inside each tile.
    """
    b, S, dev = layout.block_size, stride, ctx.device
    nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
    B, Hq, _, D = q.shape
    Hkv, g = ctx.num_kv_heads, ctx.groups
    # (B, Hkv, g, nGq, S*D): query groups reversed, heads of one KV head side by side
    qp = _pad_to(q.float(), nQ * b).view(B, Hkv, g, nQ * b // S, S, D).flip(-2)
    qp = qp.reshape(B, Hkv, g, -1, S * D)
    kp = _pad_to(k.float(), nK * b).reshape(B, Hkv, nK * b // S, S * D)  # (B, Hkv, nGk, S*D)
    n_gq, n_gk = qp.shape[3], kp.shape[2]
    # group-level visibility from absolute positions of each group's first/last token
    q_last = (torch.arange(n_gq, device=dev) * S + S - 1).clamp(max=ctx.q_len - 1) + ctx.q_offset
    k_first = torch.arange(n_gk, device=dev) * S + ctx.kv_offset
    visible = k_first[None, :] <= q_last[:, None]  # (nGq, nGk)
    visible &= (torch.arange(n_gk, device=dev) * S < ctx.kv_len)[None, :]
    if ctx.sliding_window is not None:
        k_last = k_first + S - 1
        visible &= q_last[:, None] - k_last[None, :] < ctx.sliding_window + S
    visible = visible[None, None].expand(B, 1, -1, -1)
    if ctx.key_valid is not None:
        valid = _pad_to(ctx.key_valid[:, None, :, None].float(), nK * b)
        group_valid = valid.view(B, 1, n_gk, S).amax(-1) > 0  # (B, 1, nGk)
        visible = visible & group_valid[:, :, None, :]
    hidden = ~visible
    scale = ctx.scaling / S
    tiles = torch.zeros(B, Hq, nQ, nK, device=dev)
    per_tile = b // S
    for start in range(0, n_gq, _GROUP_CHUNK):
        stop = min(start + _GROUP_CHUNK, n_gq)
        c = stop - start
        # causal: this chunk's queries see no key group past its last query, so stop there
        last_query = ctx.q_offset + min(stop * S, ctx.q_len) - 1
        seen_tiles = min(nK, max(0, (last_query - ctx.kv_offset) // b + 1))
        if seen_tiles == 0:
            continue
        hi = seen_tiles * per_tile
        rows = qp[:, :, :, start:stop].reshape(B, Hkv, g * c, S * D) * scale
        scores = torch.matmul(rows, kp[:, :, :hi].transpose(-1, -2)).view(B, Hq, c, hi)
        scores.masked_fill_(hidden[:, :, start:stop, :hi], float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num_(0.0)  # all-hidden rows (padding) -> 0
        probs = probs.view(B, Hq, c, seen_tiles, per_tile).sum(-1)  # (B, Hq, c, seen_tiles)
        q_tile = torch.arange(start, stop, device=dev) // per_tile
        tiles[..., :seen_tiles].index_add_(2, q_tile, probs)
    return tiles / tiles.sum(-1, keepdim=True).clamp_min(1e-12)


@register_method
@dataclass
class XAttention(Method):
    """XAttention (Xu et al., 2025, arXiv:2503.16428): antidiagonal scoring, threshold selection.

    Per query tile, keep the fewest key tiles whose estimated mass reaches a threshold; the
    first (sink) tile and the diagonal are always kept. Without a profile one ``threshold``
    serves every head. With a profile (``sparseattn profile --kind xattention``) each head uses
    its own calibrated threshold, and ``threshold`` is read as the target recall of true
    attention mass: the smallest stored target at or above it is used. Choices where the paper
    is open: the group-level softmax is scaled by 1/(sqrt(D) * stride); groups are formed on the
    query and key tensors as given (in chunked prefill they need not align with the prefix);
    GQA scores each query head against its KV head; per-head thresholds are found by a grid
    search on calibration inputs rather than the paper's dynamic programming.
    """

    name: ClassVar[str] = "xattention"
    paper: ClassVar[str] = (
        "XAttention: Block Sparse Attention with Antidiagonal Scoring (arXiv:2503.16428)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"threshold": 1.0}
    default_grid: ClassVar[dict] = {"threshold": [0.8, 0.9, 0.95]}

    threshold: float = knob(
        0.9,
        low=0.01,
        high=1.0,
        help="estimated mass each query tile keeps (with a profile: target recall; 1 = dense)",
    )
    stride: int = knob(
        8,
        choices=(4, 8, 16),
        help="antidiagonal stride S (cost ~1/S of dense QK); divides every block size",
    )
    keep_sink: bool = knob(True, choices=(True, False), help="always keep the first key tile")
    profile: str = knob(
        "",
        help="per-head thresholds: '' (none), 'auto' (the shipped profile of the hooked model), "
        "a shipped profile name, or a .json file written by `sparseattn profile --kind xattention`",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        settings = {"block_size": self.block_size, "stride": self.stride}
        self._profile = open_profile(self.profile, "xattention", **settings)

    def bind(self, config: Any) -> None:
        settings = {"block_size": self.block_size, "stride": self.stride}
        self._profile = bind_profile(self._profile, self.profile, "xattention", config, **settings)

    def head_thresholds(self, ctx: AttentionContext) -> float | torch.Tensor:
        """The threshold knob, or (1, Hq, 1, 1) per-head thresholds from the profile."""
        if self._profile is None:
            if self.profile == "auto":
                raise UsageError(
                    "xattention with profile='auto' needs the model: run it through "
                    "sparse_attention(model, ...), or pass profile=FILE.json"
                )
            return self.threshold
        level = self._profile.level_at_least(self.threshold)
        entries = self._profile.layer(level, ctx.layer_idx, ctx.num_q_heads)
        values = torch.tensor(entries, dtype=torch.float32, device=ctx.device)
        return values.view(1, -1, 1, 1)

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        if self.threshold >= 1.0:
            return layout.every_tile(ctx.num_q_heads)
        scores = antidiagonal_tile_scores(q, k, ctx, layout, self.stride)
        mask = keep_cumulative_mass(scores, self.head_thresholds(ctx))
        if self.keep_sink:
            mask[..., 0] = True
        return layout.finalize(mask)

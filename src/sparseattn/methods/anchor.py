"""AnchorAttention: keys whose pooled logit comes within ``theta`` of an anchor from the sink
and the local tile, chosen per key column (stripes) and run as the tiles holding them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..backends.masks import BlockLayout, key_positions, num_blocks, query_positions, row_starts
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .common import row_sink_tiles
from .estimators import grouped_scores

# query tiles whose stripe scores are held at once: memory O(chunk x Lk) per query head
_TILE_CHUNK = 64


def _masked_max(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~visible, float("-inf")).amax(-1)


def anchor_logits(q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, b: int) -> torch.Tensor:
    """(B, Hq, Lq) float32 anchor per query: its largest scaled logit over the row's first
    ``b`` real keys (the sink) and the key tile(s) holding the query tile's own positions
    (the local tile), causal, window and padding applied; -inf where it sees none of them.
    """
    B, Hq, Lq, D = q.shape
    Hkv, g, dev = ctx.num_kv_heads, ctx.groups, ctx.device
    qf = q.float() * ctx.scaling
    q_pos = query_positions(ctx)  # (Lq,)
    valid = ctx.key_valid

    def visible(k_index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, ..., rows, keys) bool for local key indices (B or 1, ..., keys) and query positions."""
        k_pos = k_index + ctx.kv_offset
        held = (k_index >= 0) & (k_index < ctx.kv_len)
        seen = (k_pos[..., None, :] <= rows[..., :, None]) & held[..., None, :]
        if ctx.sliding_window is not None:
            seen = seen & (rows[..., :, None] - k_pos[..., None, :] < ctx.sliding_window)
        if valid is not None:
            flat = k_index.clamp(0, ctx.kv_len - 1).expand(B, *k_index.shape[1:])
            real = valid.gather(1, flat.reshape(B, -1)).view(flat.shape)
            seen = seen & real[..., None, :]
        return seen

    # the sink: the first b real keys of each row
    start = row_starts(ctx)
    first = torch.zeros(B, dtype=torch.long, device=dev) if start is None else start - ctx.kv_offset
    sink_index = first[:, None] + torch.arange(b, device=dev)  # (B, b)
    sink_keys = k.float().gather(
        2, sink_index.clamp(0, ctx.kv_len - 1)[:, None, :, None].expand(-1, Hkv, -1, D)
    )  # (B, Hkv, b, D)
    sink_scores = grouped_scores(qf, sink_keys)  # (B, Hq, Lq, b)
    sink_seen = visible(sink_index, q_pos)[:, None]  # (B, 1, Lq, b)
    anchor = _masked_max(sink_scores, sink_seen)

    # the local tile: key tiles holding the first and last position of each query tile
    nQ, nK = num_blocks(Lq, b), num_blocks(ctx.kv_len, b)
    tile_q = F.pad(qf, (0, 0, 0, nQ * b - Lq)).view(B, Hkv, g, nQ, b, D)
    row_pos = (torch.arange(nQ * b, device=dev) + ctx.q_offset).clamp(max=ctx.q_offset + Lq - 1)
    own = ((row_pos - ctx.kv_offset).clamp(0, ctx.kv_len - 1) // b).view(nQ, b)
    tiles = torch.stack([own[:, 0], own[:, -1]], -1)  # (nQ, 2) key tiles of each query tile
    local_index = (tiles[..., None] * b + torch.arange(b, device=dev)).view(nQ, 2 * b)
    kp = F.pad(k.float(), (0, 0, 0, nK * b - ctx.kv_len))  # (B, Hkv, nK b, D)
    local_keys = kp[:, :, local_index]  # (B, Hkv, nQ, 2b, D)
    local_scores = torch.einsum("bhgqrd,bhqkd->bhgqrk", tile_q, local_keys)
    rows = F.pad(q_pos, (0, nQ * b - Lq), value=-1).view(nQ, b)  # padded rows see nothing
    local_seen = visible(local_index[None], rows[None])  # (B, nQ, b, 2b)
    local = _masked_max(local_scores, local_seen[:, None, None]).view(B, Hq, nQ * b)[..., :Lq]
    return torch.maximum(anchor, local)


@register_method
@dataclass
class AnchorAttention(Method):
    """AnchorAttention (Zhang et al., EMNLP 2025, arXiv:2505.23520): difference-aware stripes.

    Per query: the anchor is its largest logit over the initial keys and the local (diagonal)
    tile (Sec. 3.1). Per query tile: the mean of its queries is dotted with every key (one
    stripe per key column), and a key is kept when that logit is within ``theta`` of the tile's
    mean anchor (Sec. 3.2); the ``step`` query tiles of a group share the union of their
    stripes, as in the paper's kernel. The sink tile and the diagonal are always kept.

    Choices: the paper's fine-grained kernel gathers the kept keys one by one; sparseattn's
    kernels run tiles, so a tile holding any kept stripe is computed whole and the measured
    density counts those tiles (smaller ``block_size`` is closer to stripe granularity). The
    initial keys are each row's first ``block_size`` real keys (after left padding); the
    local tile is the key tile(s) holding the query tile's own positions; means skip rows with
    no visible anchor key (padding). ``theta=inf`` keeps every key. Defaults are the authors'
    (theta 12, step 16).
    """

    name: ClassVar[str] = "anchor"
    paper: ClassVar[str] = (
        "AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity "
        "(arXiv:2505.23520)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"theta": math.inf}
    default_grid: ClassVar[dict] = {"theta": [8.0, 12.0, 16.0]}

    theta: float = knob(
        12.0,
        low=0.0,
        high=math.inf,
        help="logit margin below the anchor a key may lie (inf = dense)",
    )
    step: int = knob(16, low=1, high=1024, help="query tiles sharing one set of stripes")

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        b = layout.block_size
        B, Hq, Lq, D = q.shape
        nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
        anchor = anchor_logits(q, k, ctx, b)  # (B, Hq, Lq)
        seen = F.pad(torch.isfinite(anchor), (0, nQ * b - Lq)).view(B, Hq, nQ, b)
        count = seen.sum(-1).clamp_min(1)  # (B, Hq, nQ)
        mean_anchor = anchor.nan_to_num(0.0, neginf=0.0)
        mean_anchor = F.pad(mean_anchor, (0, nQ * b - Lq)).view(B, Hq, nQ, b).sum(-1) / count
        q_rows = F.pad(q.float(), (0, 0, 0, nQ * b - Lq)).view(B, Hq, nQ, b, D)
        pooled_q = (q_rows * seen[..., None]).sum(3) / count[..., None]  # (B, Hq, nQ, D)
        floor = (mean_anchor - self.theta).masked_fill(~seen.any(-1), float("inf"))

        # a key is a candidate for a query tile when some query of the tile may see it
        k_pos = key_positions(ctx)[:, 0]  # (1, Lk)
        q_first = torch.arange(nQ, device=ctx.device) * b + ctx.q_offset
        q_last = (q_first + b - 1).clamp(max=ctx.q_offset + Lq - 1)
        candidate = k_pos[:, None, :] <= q_last[None, :, None]  # (1, nQ, Lk)
        if ctx.sliding_window is not None:
            candidate = candidate & (
                q_first[None, :, None] - k_pos[:, None, :] < ctx.sliding_window
            )
        if ctx.key_valid is not None:
            candidate = candidate & ctx.key_valid[:, None, :]

        step = min(self.step, nQ)
        n_groups = num_blocks(nQ, step)
        mask = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool, device=ctx.device)
        per_chunk = max(1, _TILE_CHUNK // step) * step  # whole groups per chunk
        keys = k.float()
        for start in range(0, n_groups * step, per_chunk):
            stop = min(start + per_chunk, nQ)
            scores = grouped_scores(pooled_q[:, :, start:stop], keys) * ctx.scaling
            kept = (scores >= floor[:, :, start:stop, None]) & candidate[:, None, start:stop]
            rows = stop - start
            groups = num_blocks(rows, step)
            padded = F.pad(kept, (0, 0, 0, groups * step - rows))  # (B, Hq, G step, Lk)
            shared = padded.view(B, Hq, groups, step, -1).any(3, keepdim=True)
            shared = shared.expand(-1, -1, -1, step, -1).reshape(B, Hq, groups * step, -1)
            stripes = shared[:, :, :rows] & candidate[:, None, start:stop]
            stripes = F.pad(stripes, (0, nK * b - ctx.kv_len)).view(B, Hq, rows, nK, b)
            mask[:, :, start:stop] = stripes.any(-1)
        mask |= row_sink_tiles(layout, b)[:, None]
        return layout.finalize(mask)

"""DHSA: dynamic chunks, length-normalised chunk representations, chunk similarity upsampled
to tiles, the best tiles per query tile kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, num_blocks
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .common import row_sink_tiles
from .estimators import grouped_scores

_BIG = 2**31 - 1
BOUNDARY_RULES = ("content", "fixed")


def chunk_ids(k: torch.Tensor, chunk: int, rule: str) -> torch.Tensor:
    """(B, Lk) long: the chunk of every key index (chunks are runs of equal ids, in order).

    The keys are cut once per window of ``chunk`` keys. ``fixed`` cuts at every window start;
    ``content`` cuts where the window's adjacent keys are least alike (lowest cosine similarity
    of key j with key j - 1, averaged over the KV heads), so a chunk holds 1 to 2 chunk - 1 keys.
    Either way the chunk of key j is j // chunk or j // chunk + 1: nW + 1 chunk slots for
    nW = ceil(Lk / chunk) windows (some possibly empty).

    Args:
        k: (B, Hkv, Lk, D) keys.
        chunk: Window length (the mean chunk size).
        rule: One of ``BOUNDARY_RULES``.
    """
    B, _, Lk, _ = k.shape
    if rule == "fixed":
        return (torch.arange(Lk, device=k.device) // chunk).expand(B, Lk)
    n_windows = num_blocks(Lk, chunk)
    unit = torch.nn.functional.normalize(k.float(), dim=-1)  # (B, Hkv, Lk, D)
    alike = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1).mean(1)  # (B, Lk - 1): key j vs j - 1
    # a cut at j starts a chunk at key j: never at key 0, never past the last key
    alike = torch.nn.functional.pad(alike, (1, n_windows * chunk - Lk), value=float("inf"))
    cut = alike.view(B, n_windows, chunk).argmin(-1)  # (B, nW) offset inside each window
    cut = cut + torch.arange(n_windows, device=k.device) * chunk  # (B, nW) key index
    starts = torch.zeros(B, n_windows * chunk, dtype=torch.long, device=k.device)
    starts.scatter_(1, cut, 1)
    return starts.cumsum(1)[:, :Lk]  # (B, Lk)


def chunk_representations(
    x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised chunk representations: the mean of a chunk's vectors times sqrt(size).

    Args:
        x: (B, H, L, D) queries or keys.
        ids: (B, L) long chunk slot of every token, in [0, slots).
        weight: (B, L) float, 1 for a token that counts, 0 for padding.
        slots: Number of chunk slots.

    Returns:
        reps: (B, H, slots, D) float32 sum / sqrt(count) (zero for an empty slot).
        counts: (B, slots) float32 tokens counted per slot.
    """
    B, H, L, D = x.shape
    index = ids[:, None, :, None].expand(B, H, L, D)
    sums = torch.zeros(B, H, slots, D, device=x.device)
    sums.scatter_add_(2, index, x.float() * weight[:, None, :, None])  # (B, H, slots, D)
    counts = torch.zeros(B, slots, device=x.device).scatter_add_(1, ids, weight)
    return sums / counts.clamp_min(1.0).sqrt()[:, None, :, None], counts


def _span(ids: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, slots) first and last token index of each chunk slot (empty: L and -1)."""
    B, L = ids.shape
    index = torch.arange(L, device=ids.device).expand(B, L)
    first = torch.full((B, slots), L, dtype=torch.long, device=ids.device)
    last = torch.full((B, slots), -1, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(1, ids, index, "amin")
    last.scatter_reduce_(1, ids, index, "amax")
    return first, last


def _max_into_tiles(
    scores: torch.Tensor,
    first: torch.Tensor,
    last: torch.Tensor,
    longest: int,
    block: int,
    n: int,
    dim: int,
) -> torch.Tensor:
    """Max of ``scores`` along ``dim`` over the chunks touching each tile (chunks -> tiles).

    Args:
        scores: (B, H, X, Y) chunk-level scores (-inf for an empty chunk).
        first, last: (B, X or Y) token span of each chunk along ``dim`` (-1 or -2).
        longest: The most tokens a chunk holds.
        block: Tile size.
        n: Number of tiles along ``dim``.
    """
    first_tile = (first // block).clamp(0, n - 1)
    last_tile = torch.maximum(last.clamp_min(0) // block, first_tile).clamp(max=n - 1)
    shape = list(scores.shape)
    shape[dim] = n
    out = torch.full(shape, float("-inf"), device=scores.device)
    view = (first.shape[0], 1, 1, -1) if dim == -1 else (first.shape[0], 1, -1, 1)
    for step in range((longest - 2) // block + 2):  # the most tiles one chunk touches
        tile = torch.minimum(first_tile + step, last_tile).view(view).expand_as(scores)
        out.scatter_reduce_(dim, tile, scores, "amax")
    return out


def chunk_tile_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: AttentionContext,
    layout: BlockLayout,
    chunk: int,
    rule: str,
) -> torch.Tensor:
    """(B, Hq, nQ, nK) float32: the best chunk-pair similarity touching each tile (-inf: none).

    Queries share the keys' chunks (query i is key index q_offset - kv_offset + i). Chunk
    pairs with no visible (query, key) pair (future, outside the layer's window, padding only)
    are -inf before upsampling.
    """
    B, _Hq, Lq, _ = q.shape
    dev, Lk = q.device, ctx.kv_len
    ids = chunk_ids(k, chunk, rule)  # (B, Lk)
    slots = num_blocks(Lk, chunk) + 1
    valid = torch.ones(B, Lk, device=dev) if ctx.key_valid is None else ctx.key_valid.float()
    k_rep, k_count = chunk_representations(k, ids, valid, slots)  # (B, Hkv, slots, D)
    offset = ctx.q_offset - ctx.kv_offset  # query i is key index offset + i
    own = (torch.arange(Lq, device=dev) + offset).clamp(0, Lk - 1)  # (Lq,)
    low = min(max(offset, 0), Lk - 1) // chunk  # the queries' chunks lie in [low, high]
    high = min(max(offset + Lq - 1, 0), Lk - 1) // chunk + 1
    q_ids = ids[:, own] - low  # (B, Lq)
    q_slots = high - low + 1
    q_rep, q_count = chunk_representations(q, q_ids, valid[:, own], q_slots)  # (B, Hq, ., D)
    scores = grouped_scores(q_rep, k_rep) * ctx.scaling  # (B, Hq, q_slots, slots)

    # visibility of a chunk pair, from the key-index spans of its valid keys and its queries
    k_first, k_last = _span(torch.where(valid > 0, ids, slots), slots + 1)
    k_first, k_last = k_first[:, :slots], k_last[:, :slots]  # (B, slots) valid keys only
    qs_first, qs_last = _span(q_ids, q_slots)  # (B, q_slots) query index
    seen = k_first[:, None, :] <= (qs_last + offset)[:, :, None]  # (B, q_slots, slots)
    if ctx.sliding_window is not None:
        seen &= k_last[:, None, :] + ctx.sliding_window - 1 >= (qs_first + offset)[:, :, None]
    seen &= (k_count > 0)[:, None, :] & (q_count > 0)[:, :, None]
    scores = scores.masked_fill(~seen[:, None], float("-inf"))

    # upsample: a tile scores the best chunk pair that touches it
    longest = chunk if rule == "fixed" else 2 * chunk - 1
    span_first, span_last = _span(ids, slots)  # (B, slots) every key, padding included
    b = layout.block_size
    scores = _max_into_tiles(
        scores, span_first, span_last, longest, b, layout.n_kv_blocks, -1
    )  # (B, Hq, q_slots, nK)
    return _max_into_tiles(
        scores, qs_first, qs_last, longest, b, layout.n_q_blocks, -2
    )  # (B, Hq, nQ, nK)


@register_method
@dataclass
class DHSA(Method):
    """DHSA (Xiong et al., NeurIPS 2025, arXiv:2510.24606): dynamic hierarchical sparse attention.

    The sequence is cut into variable-length chunks; a chunk is represented by the mean of its
    keys (queries) times sqrt(chunk size), the length normalisation of the paper (Sec. 3); the
    chunk-to-chunk similarity Q_c K_c^T is upsampled to the token map, and every query tile keeps
    the ``budget / block_size`` key tiles with the highest upsampled similarity (the paper's
    per-token budget N_b, at tile granularity).
    Choices where the paper is open or that differ from it: the paper predicts chunk boundaries
    with a small trained network; here ``boundary="content"`` cuts once per window of ``chunk``
    keys where adjacent keys are least alike (cosine similarity, averaged over KV heads; chunks
    of 1 to 2 chunk - 1 keys, the same for every head and for the queries), and ``"fixed"`` cuts
    every ``chunk`` keys. A tile's score is the maximum similarity over the chunk pairs that
    touch it (the best token pair inside it); pairs with no visible token pair are ignored;
    padded keys and queries do not enter the means. The first valid tile of each row (the
    attention sink) is kept on top of the budget when ``keep_sink`` is set. Cost: the chunk
    similarity is O(Hq (L / chunk)^2 D), its memory O(Hq (L / chunk)^2).
    """

    name: ClassVar[str] = "dhsa"
    paper: ClassVar[str] = (
        "Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs "
        "(arXiv:2510.24606)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [512, 1024, 2048]}

    budget: int = knob(
        1024, low=1, high=_BIG, help="key tokens kept per query, as whole tiles (N_b)"
    )
    chunk: int = knob(
        32, choices=(8, 16, 32, 64, 128), help="mean chunk size: one boundary per window of this"
    )
    boundary: str = knob(
        "content",
        choices=BOUNDARY_RULES,
        help="chunk boundaries: 'content' (least-alike adjacent keys) or 'fixed'",
    )
    keep_sink: bool = knob(True, choices=(True, False), help="always keep the first valid tile")

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        top = num_blocks(self.budget, layout.block_size)
        if top >= layout.n_kv_blocks:
            return layout.every_tile(ctx.num_q_heads)
        scores = chunk_tile_scores(q, k, ctx, layout, self.chunk, self.boundary)
        scores = scores.masked_fill(~layout.visible[:, None], float("-inf"))
        best = scores.topk(top, dim=-1)  # (B, Hq, nQ, top)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(-1, best.indices, best.values > float("-inf"))
        if self.keep_sink:
            mask |= row_sink_tiles(layout, 1)[:, None]
        return layout.finalize(mask)

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        # the budget, the sink tile, and a diagonal over up to two key tiles
        top = num_blocks(self.budget, layout.block_size)
        return min(layout.n_kv_blocks, top + int(self.keep_sink) + 2)

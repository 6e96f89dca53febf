"""SnapKV eviction: the prompt's last queries vote for the prompt keys each KV head keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...cache.layers import KVLayer
from ...errors import UsageError
from ...registry import register_policy
from ...types import EMPTY_POSITION, AttentionContext, Phase
from ..base import knob
from ..estimators import last_query_probs
from .base import EvictionPolicy

_BIG = 2**31 - 1


def observation_scores(
    query: torch.Tensor, keys: torch.Tensor, ctx: AttentionContext, window: int, kernel: int
) -> torch.Tensor:
    """Pooled attention of the last ``window`` queries on the keys before them.

    Each query's softmax over the keys it sees (causal, padding) is averaged over the queries
    and over the query heads of a GQA group, then max-pooled along the keys (``kernel`` wide,
    centred) so a kept key brings its neighbours. Observation-window keys take no part in the
    pooling: they are kept anyway.

    Args:
        query: (B, Hq, L, D) the prompt's queries.
        keys: (B, Hkv, L, D) the prompt's keys (slot j holds position j).
        ctx: The prefill call's context (``key_valid`` marks padding).
        window: Observation window in tokens (the last ``min(window, L)`` slots).
        kernel: Odd pooling width in keys (1: no pooling).

    Returns:
        (B, Hkv, L - w) float32 scores of the prefix slots, -inf on padding.
    """
    B, Hkv, L = ctx.batch, ctx.num_kv_heads, ctx.kv_len
    w = min(window, L)
    prefix = L - w
    probs = last_query_probs(query, keys, ctx, w)  # (B, Hq, w, L)
    votes = probs[..., :prefix].reshape(B, Hkv, ctx.groups, w, prefix).mean((2, 3))  # (B, Hkv, Lp)
    if kernel > 1:
        votes = torch.nn.functional.max_pool1d(votes, kernel, stride=1, padding=kernel // 2)
    if ctx.key_valid is not None:
        votes = votes.masked_fill(~ctx.key_valid[:, None, :prefix], float("-inf"))
    return votes


def best_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices of ``scores`` along the last axis, highest first, ties in index order.

    Pooling makes exact ties (a peak's neighbours share its score); breaking them by index
    keeps a row's choice the same whatever padding sits before it.
    """
    return scores.sort(dim=-1, descending=True, stable=True).indices


def top_per_head(scores: torch.Tensor, capacities: list[int]) -> torch.Tensor:
    """(B, H, Lp) bool: the ``capacities[b]`` highest-scoring slots of every head of row b."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    most = max(capacities)
    if most == 0:
        return keep
    top = best_first(scores)[..., :most]  # (B, H, most)
    caps = torch.tensor(capacities, device=scores.device)[:, None, None]  # (B, 1, 1)
    within = torch.arange(most, device=scores.device) < caps  # (B, 1, most)
    return keep.scatter_(-1, top, within.expand_as(top))


def retain_prefix(layer: KVLayer, keep: torch.Tensor, length: int) -> None:
    """Compact ``layer`` to the kept prefix slots plus every slot after the prefix.

    Heads that keep fewer prefix slots than the widest get empty slots (``valid`` False), so
    storage is as wide as the widest (row, head); the call's padding is dropped by ``retain``.

    Args:
        layer: The layer holding the prompt (``length`` contiguous slots).
        keep: (B, Hkv, Lp) bool over the prefix slots [0, Lp).
        length: Slots held; [Lp, length) is the observation window, always kept.
    """
    B, H, prefix = keep.shape
    device = keep.device
    width = int(keep.sum(-1).max())  # one host read, after prefill
    index = torch.arange(prefix, device=device).expand(B, H, prefix)
    order = torch.where(keep, index, prefix).sort(-1).values[..., :width]  # kept first, ascending
    valid = order < prefix
    window = torch.arange(prefix, length, device=device).expand(B, H, length - prefix)
    slots = torch.cat([order.clamp(max=max(prefix - 1, 0)), window], -1)  # (B, H, width + w)
    valid = torch.cat([valid, torch.ones_like(window, dtype=torch.bool)], -1)
    layer.retain(slots, valid)


@register_policy
@dataclass
class SnapKV(EvictionPolicy):
    """SnapKV (Li et al., NeurIPS 2024, arXiv:2404.14469): after prefill each KV head keeps the
    prompt keys its observation window attends to most.

    The last ``window`` prompt queries score every earlier prompt key with their softmax
    attention, averaged over those queries and over the query heads of the GQA group, then
    max-pooled along the keys with width ``kernel``; each KV head keeps its top-scoring prefix
    keys plus the observation window itself. Budget per row of n prompt tokens (padding
    excluded): with ``capacity`` > 0 each head keeps ``capacity`` prefix keys + the window;
    with ``capacity`` = 0 each head keeps n - floor(compression * n) tokens, window included,
    but never fewer than the window. Choices: every prompt chunk is compressed after it is
    attended (chunked prefill, e.g. ``generate(..., prefill_chunk_size=C)``, and any later
    multi-token call): the chunk's last ``window`` queries score every key the layer holds
    (the kept keys of earlier chunks and the chunk's own), and the layer keeps the budget of
    the n tokens seen so far, so memory stays at budget + one chunk whatever the prompt length
    (the chunked SnapKV of the literature; a single call is the paper's method exactly). Pooling
    runs over held slots, so after a compaction a kept key's neighbours are the keys held
    beside it. Generated tokens count towards n and are kept between calls. The observation
    window is the call's last ``window`` slots, each row's last tokens under left padding (what
    ``generate`` does); padding is never scored nor kept and each batch row selects on its own;
    equal scores (pooling makes them) go to the earlier slot, so a row chooses the same with or
    without padding before it; a row whose budget covers what it holds keeps it whole, and when
    every row does the layer stays as it is (token-identical to no eviction while nothing was
    dropped). The model's sliding-window layers keep their window. Scoring materialises
    (B, Hq, window, L) fp32 attention probabilities once per layer.
    """

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = (
        "SnapKV: LLM Knows What You are Looking for Before Generation (arXiv:2404.14469)"
    )
    needs_queries: ClassVar[bool] = True
    default_grid: ClassVar[dict] = {"compression": [0.5, 0.75, 0.9]}

    compression: float = knob(
        0.5, low=0.0, high=1.0, help="fraction of the prompt removed (when capacity is 0)"
    )
    capacity: int = knob(
        0,
        low=0,
        high=_BIG,
        help="prompt tokens kept per KV head besides the window; 0: compression",
    )
    window: int = knob(32, low=1, high=_BIG, help="last prompt queries that vote; always kept")
    kernel: int = knob(7, low=1, high=255, help="max-pooling width along the keys (odd)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("capacity", "window", "kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{self.name}: knob {name}={value!r} must be an integer")
        if self.kernel % 2 == 0:
            raise UsageError(
                f"{self.name}: knob kernel={self.kernel} must be odd (a centred pooling window); "
                "allowed: odd integers in [1, 255]"
            )

    def prefix_capacity(self, tokens: int, prefix: int) -> int:
        """Prefix keys one head keeps of a row with ``tokens`` prompt tokens, ``prefix`` of
        them before the observation window (padding excluded)."""
        if self.capacity > 0:
            return min(self.capacity, prefix)
        kept = tokens - int(self.compression * tokens + 1e-9)  # floor, blind to float error
        return min(max(kept - (tokens - prefix), 0), prefix)

    def capacities(self, layer: KVLayer, tokens: list[int], prefix: list[int]) -> list[int]:
        """Prefix keys every head of this layer keeps, per row."""
        return [self.prefix_capacity(n, p) for n, p in zip(tokens, prefix)]

    def choose(self, scores: torch.Tensor, capacities: list[int]) -> torch.Tensor:
        """(B, Hkv, Lp) scores -> (B, Hkv, Lp) bool prefix slots kept."""
        return top_per_head(scores, capacities)

    def after_prefill(self, layer: KVLayer, query: torch.Tensor, ctx: AttentionContext) -> None:
        if layer.bounded:
            return  # sliding layers keep their own window
        keys, _, positions = layer.call_view()
        w = min(self.window, ctx.q_len, ctx.kv_len)
        prefix = ctx.kv_len - w
        tokens = prompt_tokens(layer, ctx)
        if prefix == 0:
            return
        held = held_prefix(ctx, positions, prefix)  # (B, Hkv or 1, Lp) bool
        before = held.sum(-1).amax(-1).tolist()  # widest head of each row
        caps = self.capacities(layer, tokens, [max(t - w, 0) for t in tokens])
        if all(c >= b for c, b in zip(caps, before)):
            return  # every row keeps what it holds
        scores = observation_scores(query, keys, ctx, w, self.kernel)
        scores = scores.masked_fill(~held, float("-inf"))
        keep = self.choose(scores, caps) & held
        retain_prefix(layer, keep, ctx.kv_len)


def prompt_tokens(layer: KVLayer, ctx: AttentionContext) -> list[int]:
    """Tokens each row has seen so far, padding excluded (what the compression rate applies to).

    The padding count of a row is read from its first call (left padding sits there) and kept
    on the layer, so later chunks, whose keys may be compacted already, count from it.
    """
    if ctx.phase is Phase.PREFILL or layer.padding_tokens is None:
        if ctx.key_valid is None:
            layer.padding_tokens = torch.zeros(ctx.batch, dtype=torch.long, device=ctx.device)
        else:
            layer.padding_tokens = (~ctx.key_valid).sum(-1)  # (B,)
    return (layer.seen - layer.padding_tokens).tolist()  # one host read per prompt chunk


def held_prefix(ctx: AttentionContext, positions: torch.Tensor | None, prefix: int) -> torch.Tensor:
    """(B, Hkv or 1, Lp) bool: prefix slots holding a real (non-padding, non-empty) key."""
    if positions is not None:
        return positions[..., :prefix] != EMPTY_POSITION
    if ctx.key_valid is not None:
        return ctx.key_valid[:, None, :prefix]
    return torch.ones(ctx.batch, 1, prefix, dtype=torch.bool, device=ctx.device)

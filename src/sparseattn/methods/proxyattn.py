"""ProxyAttn: a few proxy heads score tiles for their GQA group; every head keeps its own budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, base_token_mask
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .estimators import keep_cumulative_mass, last_query_probs

_SCORE_ELEMENTS = 1 << 24  # proxy scores held at once (64 MiB of float32)
_ROWS = 256  # sampled queries scored at once, at most


def proxy_members(groups: int, proxies: int) -> torch.Tensor:
    """(g,) long: the proxy of each query head of a GQA group (contiguous, near-equal parts)."""
    count = min(proxies, groups)
    return torch.arange(groups) * count // groups


def proxy_queries(q: torch.Tensor, ctx: AttentionContext, members: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, P, Lq, D) float32: each proxy is the mean query of the heads it stands for."""
    B, _, Lq, D = q.shape
    count = int(members.max()) + 1
    weights = torch.nn.functional.one_hot(members, count).T.float().to(q.device)  # (P, g)
    weights = weights / weights.sum(-1, keepdim=True)
    grouped = q.float().view(B, ctx.num_kv_heads, ctx.groups, Lq, D)  # (B, Hkv, g, Lq, D)
    return torch.einsum("pg,bhgld->bhpld", weights, grouped)


def proxy_tile_mass(
    proxy: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, layout: BlockLayout, stride: int
) -> torch.Tensor:
    """(B, Hkv, P, nQ, nK) float32 attention mass per tile, estimated by the proxies.

    Every ``stride``-th query of a tile (its last query, and the call's last query) attends
    exactly, token by token, to the visible keys of its KV head; its probabilities are summed
    per key tile and averaged over the sampled queries of the query tile (rows sum to 1).
    """
    b, dev = layout.block_size, ctx.device
    B, Hkv, P, Lq, D = proxy.shape
    nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
    pad = nK * b - ctx.kv_len
    keys = torch.nn.functional.pad(k.float(), (0, 0, 0, pad))  # (B, Hkv, nK b, D)
    mass = torch.zeros(B, Hkv, P, nQ, nK, device=dev)
    picked = list(range(stride - 1, Lq, stride))
    if not picked or picked[-1] != Lq - 1:
        picked.append(Lq - 1)  # every tile, the ragged last one too, has a sampled query
    sampled = torch.tensor(picked, device=dev)
    per_tile = torch.zeros(nQ, device=dev).index_add_(
        0, sampled // b, torch.ones(sampled.numel(), device=dev)
    )  # (nQ,) sampled queries per query tile
    # sampled rows at once: bounded memory, and short enough to skip most future keys
    rows = min(_ROWS, max(1, _SCORE_ELEMENTS // max(1, B * Hkv * P * nK * b)))
    for start in range(0, len(picked), rows):
        index = sampled[start : start + rows]  # (n,) query indices
        first, last = picked[start], picked[min(start + rows, len(picked)) - 1]
        # causal: these queries see no key tile past the last one's position
        seen = min(nK, max(0, (ctx.q_offset + last - ctx.kv_offset) // b + 1))
        if seen == 0:
            continue
        n = index.numel()
        rows_q = proxy[:, :, :, index].reshape(B, Hkv, P * n, D) * ctx.scaling
        scores = torch.matmul(rows_q, keys[:, :, : seen * b].transpose(-1, -2))
        scores = scores.view(B, Hkv, P, n, seen * b)  # (B, Hkv, P, n, seen b)
        if ctx.softcap is not None:
            scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
        visible = base_token_mask(ctx, first, last + 1)[:, :, index - first]  # (B, 1, n, Lk)
        visible = torch.nn.functional.pad(visible, (0, pad))[..., : seen * b]
        scores.masked_fill_(~visible[:, :, None], float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num_(0.0)  # padded queries see nothing
        probs = probs.view(B, Hkv, P, n, seen, b).sum(-1)  # (B, Hkv, P, n, seen)
        mass[..., :seen].index_add_(3, index // b, probs)
    return mass / per_tile.clamp_min(1.0)[:, None]


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: AttentionContext,
    layout: BlockLayout,
    gamma: float,
    last_queries: int,
) -> torch.Tensor:
    """(B, Hq, nQ) long: tiles each head keeps in each query tile.

    A head's own statistic is the exact attention of its last ``last_queries`` queries, summed
    per key tile: the fewest tiles holding ``gamma`` of it, as a share of the tiles the last
    query tile sees, is the head's budget ratio; each query tile keeps that share of the tiles
    it sees (rounded up, at least one).
    """
    b = layout.block_size
    B, Hq = q.shape[:2]
    probs = last_query_probs(q, k, ctx, last_queries)  # (B, Hq, n, Lk)
    pad = layout.n_kv_blocks * b - ctx.kv_len
    mass = torch.nn.functional.pad(probs.sum(2), (0, pad)).view(B, Hq, -1, b).sum(-1)
    needed = keep_cumulative_mass(mass, gamma).sum(-1)  # (B, Hq) tiles
    seen = layout.visible.sum(-1)  # (B, nQ) visible tiles per query tile
    last = seen[:, -1:, None].clamp_min(1)  # (B, 1, 1) seen by the last query tile
    share = needed[:, :, None] * seen[:, None, :]  # (B, Hq, nQ): needed / last of each row
    return torch.div(share + last - 1, last, rounding_mode="floor").clamp_min(1)


@register_method
@dataclass
class ProxyAttn(Method):
    """ProxyAttn (Wang et al., 2025, arXiv:2509.24745): guided sparse attention via proxy heads.

    The query heads of a GQA group attend to highly overlapping tokens but with different
    sparsity (the paper's observation). So a few proxy heads per group (``proxies``; each the
    mean query of a contiguous part of the group) score every tile at token level against the
    group's keys, and every head keeps, in each query tile, its own number of tiles, ranked by
    its proxy's scores. The per-head budget is block-aware: the fewest key tiles holding
    ``gamma`` of the head's own exact attention from its last ``last_queries`` queries, taken
    as a share of the tiles the last query tile sees and applied as that share to every query
    tile. Choices where the paper is open: proxies are means of query heads over the group's
    shared keys (no K pooling across KV heads); tile scores are the mass of the proxies'
    softmax (summed over key tiles, averaged over the sampled queries of a query tile);
    ``stride`` > 1 samples every stride-th query (the paper scores every query, ``stride=1``);
    no tile is forced beyond the diagonal.
    """

    name: ClassVar[str] = "proxyattn"
    paper: ClassVar[str] = (
        "ProxyAttn: Guided Sparse Attention via Representative Heads (arXiv:2509.24745)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"gamma": 1.0}
    default_grid: ClassVar[dict] = {"gamma": [0.85, 0.9, 0.95]}

    gamma: float = knob(
        0.9, low=0.01, high=1.0, help="share of its own attention mass each head's budget holds"
    )
    proxies: int = knob(
        1, low=1, high=256, help="proxy heads per GQA group (>= group size: every head its own)"
    )
    stride: int = knob(
        1, choices=(1, 2, 4, 8, 16), help="score every stride-th query of a tile with the proxies"
    )
    last_queries: int = knob(
        64, low=1, high=4096, help="final queries whose exact attention sets each head's budget"
    )

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        B, Hq = q.shape[:2]
        if self.gamma >= 1.0:
            return layout.every_tile(Hq)
        members = proxy_members(ctx.groups, self.proxies)  # (g,)
        proxy = proxy_queries(q, ctx, members)  # (B, Hkv, P, Lq, D)
        mass = proxy_tile_mass(proxy, k, ctx, layout, self.stride)  # (B, Hkv, P, nQ, nK)
        mass = mass.masked_fill(~layout.visible[:, None, None], -1.0)  # invisible ranks last
        order = mass.argsort(dim=-1, descending=True, stable=True)
        rank = order.argsort(dim=-1)  # (B, Hkv, P, nQ, nK) place of each tile in its row
        rank = rank.index_select(2, members.to(q.device))  # (B, Hkv, g, nQ, nK)
        rank = rank.view(B, Hq, layout.n_q_blocks, layout.n_kv_blocks)
        budget = head_budgets(q, k, ctx, layout, self.gamma, self.last_queries)  # (B, Hq, nQ)
        return layout.finalize(rank < budget[..., None])

    def max_tiles_per_row(self, layout: BlockLayout) -> int | None:
        return None

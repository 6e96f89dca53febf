"""Quest: query-aware page selection from per-page key bounds (Tang et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import UsageError
from ...registry import register_method
from ...types import EMPTY_POSITION, AttentionContext, DecodeView, PageSelection, Phase
from ..base import Method, knob

_BIG = 2**31 - 1
PAGE_SIZES = (8, 16, 32, 64, 128)


@dataclass
class PageBounds:
    """Elementwise min and max of the keys of every page of one cache layer.

    Attributes:
        low: (B, Hkv, nP, D) min over the page's slots.
        high: (B, Hkv, nP, D) max over the page's slots.
        writes: The layer's update count these bounds include.
    """

    low: torch.Tensor
    high: torch.Tensor
    writes: int


def page_bounds(keys: torch.Tensor, page_size: int, first: int = 0) -> tuple[torch.Tensor, ...]:
    """Min and max per page of ``keys`` (B, H, S, D) from page ``first`` on; a ragged last page
    is bounded by the slots it holds."""
    B, H, S, D = keys.shape
    start = first * page_size
    n_pages = -(-S // page_size) - first
    part = keys[:, :, start:].float()
    pad = n_pages * page_size - part.shape[2]
    low = torch.nn.functional.pad(part, (0, 0, 0, pad), value=float("inf"))
    high = torch.nn.functional.pad(part, (0, 0, 0, pad), value=float("-inf"))
    low = low.view(B, H, n_pages, page_size, D).amin(3)
    high = high.view(B, H, n_pages, page_size, D).amax(3)
    return low, high


@register_method
@dataclass
class Quest(Method):
    """Quest page selection (Tang et al., ICML 2024, arXiv:2406.10774): decode reads the pages
    whose key bounds promise the largest q.k.

    Every page of ``block_size`` cache slots keeps the elementwise min and max of its keys;
    the score of a page for query q is sum_d max(q_d min_d, q_d max_d), an upper bound of q.k
    over the page; the top pages within ``budget`` tokens are read, plus the sink pages, the
    pages of the last ``window`` tokens and always the current page. Choices: the bounds are
    per-layer state kept with the cache and updated incrementally (only the page written by a
    step is recomputed, which also covers ring slots overwritten by a bounded cache, plus the
    sink pages a re-rotating cache rewrites); with GQA
    a page is chosen per KV head (one gather per KV head) by summing its query heads' softmax
    over their page bounds, so a head with larger logits does not drown the others; or per
    query head as in the paper with ``per_query_head=True``; the budget counts
    the forced pages (page-aligned sink and window edges may add up to two pages).
    """

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = (
        "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (arXiv:2406.10774)"
    )
    phases: ClassVar = frozenset({Phase.DECODE})
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [256, 512, 1024]}

    block_size: int = knob(16, choices=PAGE_SIZES, help="page size in tokens")
    budget: int = knob(1024, low=1, high=_BIG, help="tokens read per step (whole pages)")
    sink: int = knob(0, low=0, high=_BIG, help="first tokens always read")
    window: int = knob(0, low=0, high=_BIG, help="most recent tokens always read")
    per_query_head: bool = knob(False, choices=(False, True), help="select per query head")

    def __post_init__(self) -> None:
        super().__post_init__()
        forced = self.sink + self.window + self.block_size
        if self.budget < forced:
            raise UsageError(
                f"quest: knob budget={self.budget} is below what is always read (sink {self.sink}"
                f" + window {self.window} + the current page {self.block_size} = {forced}); "
                f"allowed: budget >= {forced}"
            )

    @property
    def state_key(self) -> str:
        return f"quest:{self.block_size}"

    def bounds(self, view: DecodeView) -> PageBounds:
        """This layer's page bounds, updated with the latest write (rebuilt if any was missed)."""
        P, keys = self.block_size, view.keys
        state = view.state.get(self.state_key)
        start, stop = view.last_write
        fresh = state is None or state.writes != view.writes - 1 or stop - start != 1
        if fresh:
            low, high = page_bounds(keys, P)
            state = PageBounds(low, high, view.writes)
        else:
            page = start // P
            n_pages = -(-keys.shape[2] // P)
            if n_pages > state.low.shape[2]:  # a new page: grow by one page
                grow = n_pages - state.low.shape[2]
                state.low = torch.nn.functional.pad(state.low, (0, 0, 0, grow))
                state.high = torch.nn.functional.pad(state.high, (0, 0, 0, grow))
            low, high = page_bounds(keys[:, :, page * P : (page + 1) * P], P)
            state.low[:, :, page : page + 1] = low
            state.high[:, :, page : page + 1] = high
            first, last = view.rewritten
            if last > first:  # keys changed in place (re-rotated sinks): their pages too
                a, b = first // P, -(-last // P)
                low, high = page_bounds(keys[:, :, a * P : b * P], P)
                state.low[:, :, a:b] = low
                state.high[:, :, a:b] = high
            state.writes = view.writes
        view.state[self.state_key] = state
        return state

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> PageSelection | None:
        P = self.block_size
        n_pages = -(-ctx.kv_len // P)
        forced_at_most = -(-self.sink // P) + -(-self.window // P) + 2  # page-aligned edges
        keep = min(max(self.budget // P, forced_at_most), n_pages)
        if keep >= n_pages:
            return None  # the budget covers the cache: dense
        bounds = self.bounds(view)
        B, Hq, _, D = q.shape
        rows = q.float().view(B, ctx.num_kv_heads, ctx.groups, D)  # (B, Hkv, g, D)
        # sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min: two matmuls, no (nP, D) product
        high = torch.matmul(rows.clamp(min=0), bounds.high.transpose(-1, -2))
        scores = torch.matmul(rows.clamp(max=0), bounds.low.transpose(-1, -2)).add_(high)
        forced = self.forced_pages(ctx, n_pages)  # (B or 1, 1 or Hkv, nP)
        if self.per_query_head:
            scores = scores.view(B, Hq, n_pages)  # (B, Hq, nP)
            forced = forced.repeat_interleave(ctx.groups, 1) if forced.shape[1] > 1 else forced
        else:  # each query head votes with its softmax share, so no head drowns the others
            scores = torch.softmax(scores * ctx.scaling, dim=-1).sum(2)  # (B, Hkv, nP)
        scores = scores.masked_fill(forced, float("inf"))
        pages = scores.topk(keep, dim=-1).indices
        return PageSelection(
            pages=pages, valid=torch.ones_like(pages, dtype=torch.bool), page_size=P
        )

    def forced_pages(self, ctx: AttentionContext, n_pages: int) -> torch.Tensor:
        """(B or 1, 1 or Hkv, nP) bool: pages always read (sink, window, the current page)."""
        P = self.block_size
        if ctx.contiguous:
            first = ctx.kv_offset + torch.arange(n_pages, device=ctx.device) * P  # (nP,)
            last = (first + P - 1).clamp(max=ctx.kv_offset + ctx.kv_len - 1)
            query = ctx.q_offset
            forced = (first < self.sink) | (last > query - max(self.window, 1))
            return forced[None, None]
        positions = ctx.key_positions  # (B, Hp, Lk)
        pad = n_pages * P - ctx.kv_len
        positions = torch.nn.functional.pad(positions, (0, pad), value=EMPTY_POSITION)
        positions = positions.view(*positions.shape[:2], n_pages, P)
        held = positions != EMPTY_POSITION
        sink = (positions < self.sink) & held
        recent = (positions > ctx.q_offset - max(self.window, 1)) & held
        return (sink | recent).any(-1)

"""Quest: query-aware page selection from per-page key bounds (Tang et al., ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...backends.masks import row_starts, sink_positions
from ...backends.sdpa import decode_key_mask
from ...errors import UsageError
from ...registry import register_method
from ...types import EMPTY_POSITION, AttentionContext, DecodeView, PageSelection, Phase
from ..base import Method, knob

_BIG = 2**31 - 1
PAGE_SIZES = (8, 16, 32, 64, 128)


class PageBounds:
    """Elementwise max and min of the keys of every page of one cache layer, in one buffer
    (B, Hkv, pages, 2D) = [max | min], preallocated with room to grow like the cache.

    Attributes:
        pages: Pages covered.
        writes: The layer's update count these bounds include.
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor, writes: int) -> None:
        B, H, n, D = low.shape
        self.buffer = low.new_empty(B, H, max(n, 1) * 2, 2 * D)
        self.pages, self.writes, self.head_dim = n, writes, D
        self.buffer[:, :, :n, :D] = high
        self.buffer[:, :, :n, D:] = low

    @property
    def bounds(self) -> torch.Tensor:
        """(B, Hkv, pages, 2D) [max | min] of the covered pages (a view)."""
        return self.buffer[:, :, : self.pages]

    @property
    def high(self) -> torch.Tensor:
        return self.bounds[..., : self.head_dim]

    @property
    def low(self) -> torch.Tensor:
        return self.bounds[..., self.head_dim :]

    def grow(self, pages: int) -> None:
        """Cover ``pages`` pages (new pages are written before they are read)."""
        if pages > self.buffer.shape[2]:
            B, H, _, D2 = self.buffer.shape
            grown = self.buffer.new_empty(B, H, 2 * pages, D2)
            grown[:, :, : self.pages] = self.bounds
            self.buffer = grown
        self.pages = max(self.pages, pages)

    def set(self, first: int, low: torch.Tensor, high: torch.Tensor) -> None:
        """Overwrite pages [first, first + n) with bounds (B, Hkv, n, D)."""
        n, D = low.shape[2], self.head_dim
        self.buffer[:, :, first : first + n, :D] = high
        self.buffer[:, :, first : first + n, D:] = low

    def append(self, slot: int, key: torch.Tensor, page_size: int) -> None:
        """Fold the key (B, Hkv, 1, D) written at ``slot`` of a contiguous layer into its page."""
        page, D = slot // page_size, self.head_dim
        if slot % page_size == 0:  # a fresh page: the key is its bounds
            self.grow(page + 1)
            self.set(page, key, key)
            return
        high, low = self.buffer[:, :, page : page + 1, :D], self.buffer[:, :, page : page + 1, D:]
        torch.maximum(high, key, out=high)
        torch.minimum(low, key, out=low)


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
    the forced pages (page-aligned sink and window edges may add up to two pages); the sink is
    each row's first ``sink`` valid positions (after its left padding); pages the query cannot
    see (padding, empty slots, outside the layer's window) take no share of the vote and are
    never forced, so a padded row chooses as it would alone; the first
    ``full_layers`` layers decode densely (two, as in the paper); on contiguous unpadded keys
    the page being written is read as a slice after the chosen pages, so no mask is built.
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
    full_layers: int = knob(2, low=0, high=_BIG, help="first layers that decode densely")

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

    def bounds(self, view: DecodeView, appended: bool = False) -> PageBounds:
        """This layer's page bounds, updated with the latest write (rebuilt if any was missed).

        Args:
            appended: The latest write appended one token to a contiguous layer (its slot is
                its position), so the bounds fold it in place.
        """
        P, keys = self.block_size, view.keys
        state = view.state.get(self.state_key)
        start, stop = view.last_write
        fresh = state is None or state.writes != view.writes - 1 or stop - start != 1
        if fresh:
            state = PageBounds(*page_bounds(keys, P), view.writes)
        elif appended and view.rewritten[1] == view.rewritten[0]:
            state.append(start, keys[:, :, start:stop].float(), P)
            state.writes = view.writes
        else:
            page = start // P
            state.grow(-(-keys.shape[2] // P))
            state.set(page, *page_bounds(keys[:, :, page * P : (page + 1) * P], P))
            first, last = view.rewritten
            if last > first:  # keys changed in place (re-rotated sinks): their pages too
                a, b = first // P, -(-last // P)
                state.set(a, *page_bounds(keys[:, :, a * P : b * P], P))
            state.writes = view.writes
        view.state[self.state_key] = state
        return state

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> PageSelection | None:
        P = self.block_size
        n_pages = -(-ctx.kv_len // P)
        if ctx.layer_idx < self.full_layers:
            return None  # the paper keeps its first two layers dense
        forced_at_most = -(-self.sink // P) + -(-self.window // P) + 2  # page-aligned edges
        keep = min(max(self.budget // P, forced_at_most), n_pages)
        if keep >= n_pages and self.dense_when_covered:
            return None  # the budget covers the cache: dense
        plain = ctx.contiguous and ctx.key_valid is None and ctx.row_start is None
        plain = plain and not self.per_query_head
        plain = plain and (ctx.sliding_window is None or ctx.q_offset < ctx.sliding_window)
        bounds = self.bounds(view, appended=plain and ctx.kv_offset == 0)
        B, Hq, _, D = q.shape
        rows = q.float().view(B, ctx.num_kv_heads, ctx.groups, D) * ctx.scaling  # (B, Hkv, g, D)
        if plain:
            return self._select_plain(rows, bounds, ctx, keep, n_pages)
        # sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min: two matmuls, no (nP, D) product
        high = torch.matmul(rows.clamp(min=0), bounds.high.transpose(-1, -2))
        scores = torch.matmul(rows.clamp(max=0), bounds.low.transpose(-1, -2)).add_(high)
        visible = self.visible_pages(ctx, n_pages, P)  # (B, 1 or Hkv, nP)
        scores = scores.masked_fill(~visible[:, :, None], float("-inf"))  # (B, Hkv, g, nP)
        forced = self.forced_pages(ctx, n_pages) & visible  # (B, 1 or Hkv, nP)
        if self.per_query_head:
            scores = scores.view(B, Hq, n_pages)  # (B, Hq, nP)
            forced = forced.repeat_interleave(ctx.groups, 1) if forced.shape[1] > 1 else forced
        else:  # each query head votes with its softmax share, so no head drowns the others
            scores = torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(2)  # (B, Hkv, nP)
        scores = scores.masked_fill(forced, float("inf"))
        pages = scores.topk(keep, dim=-1).indices
        return PageSelection(
            pages=pages, valid=torch.ones_like(pages, dtype=torch.bool), page_size=P
        )

    def _select_plain(
        self, rows: torch.Tensor, bounds: PageBounds, ctx: AttentionContext, keep: int, n_pages: int
    ) -> PageSelection:
        """Contiguous unpadded keys: one matmul scores every page against [q+ | q-], the page
        being written is read as the selection's tail, the other forced pages win the top-k."""
        positive = rows.clamp(min=0)
        scores = torch.matmul(torch.cat([positive, rows - positive], -1), bounds.bounds.mT)
        scores = torch.softmax(scores, dim=-1).sum(2)  # (B, Hkv, nP) the group's soft vote
        scores = scores + self._page_bias(ctx, n_pages)
        pages = scores.topk(keep - 1, dim=-1).indices  # (B, Hkv, keep - 1)
        current = (ctx.kv_len - 1) // self.block_size * self.block_size
        return PageSelection(
            pages=pages,
            valid=torch.ones_like(pages, dtype=torch.bool),
            page_size=self.block_size,
            tail=(current, ctx.kv_len),
            all_valid=True,
        )

    def _page_bias(self, ctx: AttentionContext, n_pages: int) -> torch.Tensor:
        """(nP,) +inf on the sink and window pages, -inf on the page being written, else 0;
        the same for every layer of a step, so it is made once per step."""
        key = (n_pages, ctx.kv_offset, ctx.q_offset, ctx.kv_len, ctx.device)
        cached = getattr(self, "_bias", None)
        if cached is None or cached[0] != key:
            forced = self.forced_pages(ctx, n_pages)[0, 0]
            bias = torch.zeros(n_pages, device=ctx.device).masked_fill(forced, float("inf"))
            bias[-1] = float("-inf")  # the current page: the tail
            self._bias = cached = (key, bias)
        return cached[1]

    @staticmethod
    def visible_pages(ctx: AttentionContext, n_pages: int, page_size: int) -> torch.Tensor:
        """(B, 1 or Hkv, nP) bool: pages holding a key the query sees (a page of padding, of
        empty slots or outside the layer's window is never chosen over a visible one)."""
        visible = decode_key_mask(ctx)[:, :, 0]  # (B, 1 or Hkv, Lk)
        visible = torch.nn.functional.pad(visible, (0, n_pages * page_size - ctx.kv_len))
        return visible.view(*visible.shape[:2], n_pages, page_size).any(-1)

    def forced_pages(self, ctx: AttentionContext, n_pages: int) -> torch.Tensor:
        """(B or 1, 1 or Hkv, nP) bool: pages always read (sink, window, the current page).

        The sink is each row's first ``sink`` valid positions, after its left padding."""
        P = self.block_size
        if ctx.contiguous:
            first = ctx.kv_offset + torch.arange(n_pages, device=ctx.device) * P  # (nP,)
            last = (first + P - 1).clamp(max=ctx.kv_offset + ctx.kv_len - 1)
            recent = last > ctx.q_offset - max(self.window, 1)
            start = row_starts(ctx)
            if start is None:
                return ((first < self.sink) | recent)[None, None]
            start = start[:, None]  # (B, 1)
            sink = (first[None] < start + self.sink) & (last[None] >= start)  # (B, nP)
            return (sink | recent)[:, None]
        positions = ctx.key_positions  # (B, Hp, Lk)
        pad = n_pages * P - ctx.kv_len
        positions = torch.nn.functional.pad(positions, (0, pad), value=EMPTY_POSITION)
        positions = positions.view(*positions.shape[:2], n_pages, P)
        held = positions != EMPTY_POSITION
        sink = sink_positions(positions, ctx, self.sink) & held
        recent = (positions > ctx.q_offset - max(self.window, 1)) & held
        return (sink | recent).any(-1)

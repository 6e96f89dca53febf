"""Static patterns: dense, A-shape (StreamingLLM), tri-shape, strided (S2-Attention/LongGen)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..backends.masks import BlockLayout, num_blocks, row_starts, sink_positions
from ..registry import register_method
from ..types import AttentionContext, BlockSelection, DecodeView, PageSelection, TokenSelection
from .base import PREFILL_PHASES, Method, knob
from .common import per_head, row_sink_tiles, tile_ranges, window_tiles
from .decode.pages import all_pages, page_selection, sink_window_pages, with_row_sinks

_BIG = 2**31 - 1


@register_method
@dataclass
class Dense(Method):
    """Full causal attention (the model's own mask): the reference every method is compared to."""

    name: ClassVar[str] = "dense"
    static_pattern: ClassVar[bool] = True
    paper: ClassVar[str] = "baseline"

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        return layout.every_tile(ctx.num_q_heads)

    def select_decode(self, q, view: DecodeView, ctx: AttentionContext) -> None:
        return None


@register_method
@dataclass
class Streaming(Method):
    """A-shape: attention sink plus a local window (StreamingLLM, Xiao et al., ICLR 2024).

    Choices: sink and window are counted in tokens and rounded out to whole tiles, so a query
    may see up to one extra tile on each edge; the layer's causal mask stays exact. The sink is
    each row's first ``sink`` valid positions, so under left padding it follows the row's
    first token (its tiles and pages then differ per batch row). Applied to both phases
    without evicting the cache (eviction lives in the cache, not here).
    """

    name: ClassVar[str] = "streaming"
    static_pattern: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    )
    dense_limit: ClassVar[dict] = {"window": _BIG}
    default_grid: ClassVar[dict] = {"window": [256, 512, 1024]}

    sink: int = knob(128, low=0, high=_BIG, help="first tokens every query keeps (attention sink)")
    window: int = knob(1024, low=1, high=_BIG, help="most recent tokens every query keeps")

    def tiles(self, layout: BlockLayout) -> torch.Tensor:
        """(B or 1, nQ, nK) bool pattern shared by all heads (per row when rows are padded)."""
        return row_sink_tiles(layout, self.sink) | window_tiles(layout, self.window)

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        return layout.finalize(per_head(self.tiles(layout), layout, ctx.num_q_heads))

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        b = layout.block_size
        return sink_tile_bound(self.sink, b) + num_blocks(self.window + b - 1, b) + 1

    def select_decode(
        self, q, view: DecodeView, ctx: AttentionContext
    ) -> PageSelection | TokenSelection | None:
        """Decode: the pages (of ``block_size`` tokens) holding the sink and the last window."""
        if not ctx.contiguous:
            return sink_window_tokens(ctx, self.sink, self.window)
        P = self.block_size
        if row_starts(ctx) is not None:  # padded rows: each row's sink pages on the device
            window = sink_window_pages(ctx, P, 0, self.window)
            if len(window) == all_pages(ctx, P) and self.dense_when_covered:
                return None
            return with_row_sinks([window] * ctx.num_kv_heads, ctx, P, self.sink)
        pages = sink_window_pages(ctx, P, self.sink, self.window)
        if len(pages) == all_pages(ctx, P) and self.dense_when_covered:
            return None
        return page_selection([pages] * ctx.num_kv_heads, ctx.batch, P, ctx.device)


def sink_tile_bound(sink: int, block_size: int) -> int:
    """Tiles a sink of ``sink`` tokens may span: one more than its length in tiles when left
    padding starts it inside a tile."""
    return num_blocks(sink + block_size - 1, block_size) if sink > 0 else 0


def sink_window_tokens(ctx: AttentionContext, sink: int, window: int) -> TokenSelection:
    """Token-level sink + window over explicit key positions (a cache that already evicted);
    the sink is each row's first ``sink`` valid positions."""
    positions = ctx.key_positions  # (B, Hp, Lk)
    keep = sink_positions(positions, ctx, sink) | (positions > ctx.q_offset - window)
    keep = keep.expand(ctx.batch, ctx.num_kv_heads, -1)
    indices = torch.arange(ctx.kv_len, device=ctx.device).expand_as(keep)
    return TokenSelection(indices=indices, valid=keep)


@register_method
@dataclass
class TriShape(Streaming):
    """Tri-shape: A-shape plus the last queries attending to every key (MInference/SCBench).

    Choices: the dense rows are the query tiles holding the last ``last_queries`` positions of
    the prompt chunk; decode runs dense, as the last query of a prompt would.
    """

    name: ClassVar[str] = "tri_shape"
    paper: ClassVar[str] = (
        "SCBench: A KV Cache-Centric Analysis of Long-Context Methods (arXiv:2412.10319)"
    )
    phases: ClassVar = PREFILL_PHASES
    default_grid: ClassVar[dict] = {"window": [256, 1024]}

    last_queries: int = knob(64, low=1, high=_BIG, help="final prompt queries that attend densely")

    def tiles(self, layout: BlockLayout) -> torch.Tensor:
        _, q_last, _, _ = tile_ranges(layout)
        final = layout.ctx.q_offset + layout.ctx.q_len - 1
        dense_rows = q_last > final - self.last_queries  # (nQ,)
        return super().tiles(layout) | dense_rows[:, None]

    def max_tiles_per_row(self, layout: BlockLayout) -> int | None:
        return None  # the last rows are dense by design


@register_method
@dataclass
class Strided(Method):
    """Strided shards plus a local window (S2-Attention; LongGen's strided layers).

    Head h keeps the key tiles j with j % stride == h % stride, so the heads of a stride group
    together cover the whole context, plus the sink and a local window. Choices: the shards are
    tiles (not single tokens) so the kernel stays block-sparse; with GQA the shard follows the
    query head; the sink is each row's first ``sink`` valid positions (after its left padding),
    while shards stay on absolute tiles (a row padded by a multiple of ``stride`` tiles reads
    the shards it reads alone).
    """

    name: ClassVar[str] = "strided"
    static_pattern: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (arXiv:2407.17678)"
    )
    dense_limit: ClassVar[dict] = {"stride": 1}
    default_grid: ClassVar[dict] = {"stride": [2, 4, 8]}

    stride: int = knob(4, low=1, high=1024, help="number of shards G; head h reads shard h mod G")
    sink: int = knob(64, low=0, high=_BIG, help="first tokens every head keeps")
    window: int = knob(512, low=1, high=_BIG, help="most recent tokens every head keeps")

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        shared = row_sink_tiles(layout, self.sink) | window_tiles(layout, self.window)
        key_tile = torch.arange(layout.n_kv_blocks, device=ctx.device)
        head = torch.arange(ctx.num_q_heads, device=ctx.device)
        shard = (key_tile[None, :] % self.stride) == (head[:, None] % self.stride)  # (Hq, nK)
        mask = shared[:, None] | shard[None, :, None, :]  # (B or 1, Hq, nQ, nK)
        return layout.finalize(mask.expand(ctx.batch, -1, -1, -1))

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        b = layout.block_size
        shard = num_blocks(layout.n_kv_blocks, self.stride)
        return sink_tile_bound(self.sink, b) + num_blocks(self.window + b - 1, b) + 1 + shard

    def select_decode(
        self, q, view: DecodeView, ctx: AttentionContext
    ) -> PageSelection | TokenSelection | None:
        """Decode: query head h reads pages p with p % stride == h % stride, plus sink and window."""
        if self.stride == 1:
            return None
        if not ctx.contiguous:  # a bounded or compacted layer: the same rule on positions
            positions = ctx.key_positions.expand(ctx.batch, ctx.num_kv_heads, -1)
            positions = positions.repeat_interleave(ctx.groups, dim=1)  # (B, Hq, Lk)
            head = torch.arange(ctx.num_q_heads, device=ctx.device)[None, :, None]
            shard = (positions // self.block_size) % self.stride == head % self.stride
            keep = shard | sink_window_tokens(ctx, self.sink, self.window).valid.repeat_interleave(
                ctx.groups, dim=1
            )
            indices = torch.arange(ctx.kv_len, device=ctx.device).expand_as(keep)
            return TokenSelection(indices=indices, valid=keep)
        padded = row_starts(ctx) is not None  # then each row's sink pages come on the device
        sink = 0 if padded else self.sink
        shared = set(sink_window_pages(ctx, self.block_size, sink, self.window))
        n_pages = all_pages(ctx, self.block_size)
        rows = [
            sorted(shared.union(range(h % self.stride, n_pages, self.stride)))
            for h in range(ctx.num_q_heads)
        ]
        if padded:
            return with_row_sinks(rows, ctx, self.block_size, self.sink)
        return page_selection(rows, ctx.batch, self.block_size, ctx.device)

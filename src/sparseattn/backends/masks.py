"""Token- and block-level visibility for one attention call.

The *base* mask of a call is what dense attention in the model would compute: causal, inside
the layer's own sliding window, not padding. Sparse methods only ever remove tiles from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..types import AttentionContext, BlockSelection


def num_blocks(length: int, block_size: int) -> int:
    """ceil(length / block_size)."""
    return -(-length // block_size)


def query_positions(ctx: AttentionContext) -> torch.Tensor:
    """(Lq,) absolute positions of the queries."""
    return torch.arange(ctx.q_len, device=ctx.device) + ctx.q_offset


def key_positions(ctx: AttentionContext) -> torch.Tensor:
    """(B or 1, Hkv or 1, Lk) absolute positions of the keys (explicit or contiguous)."""
    if ctx.key_positions is not None:
        return ctx.key_positions
    return (torch.arange(ctx.kv_len, device=ctx.device) + ctx.kv_offset)[None, None]


def row_starts(ctx: AttentionContext) -> torch.Tensor | None:
    """(B,) long absolute position of each row's first valid (non-padding) token, or None when
    no row is known to be padded (every row starts at position 0).

    ``ctx.row_start`` when the call carries it (read from the whole padding mask, so it holds
    over evicted layers too); else, over contiguous keys, the first key ``key_valid`` marks
    valid (``kv_offset`` for a row with none). Computed on the device: no host read.
    """
    if ctx.row_start is not None:
        return ctx.row_start
    if ctx.key_valid is None or not ctx.contiguous:
        return None
    return ctx.kv_offset + ctx.key_valid.to(torch.uint8).argmax(-1)  # first True per row


def sink_positions(positions: torch.Tensor, ctx: AttentionContext, sink: int) -> torch.Tensor:
    """bool, ``positions`` broadcast over the batch: which positions are among the first ``sink``
    valid positions of their row (its attention sink, after any left padding).

    Args:
        positions: (B or 1, ...) long absolute positions (empty slots hold ``EMPTY_POSITION``,
            never a sink).
    """
    start = row_starts(ctx)
    if start is None:
        return positions < sink
    start = start.view(-1, *(1,) * (positions.dim() - 1))  # (B, 1, ...)
    return (positions >= start) & (positions < start + sink)


def heads_to_query_heads(mask: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...) by repeating each KV head for its query heads; 1 stays 1."""
    if mask.shape[1] == 1 or ctx.groups == 1:
        return mask
    return mask.repeat_interleave(ctx.groups, dim=1)


def base_token_mask(ctx: AttentionContext, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(B, 1 or Hq, stop - start, Lk) bool: the dense model's own mask (causal, window, padding).

    Computed from key positions, so it holds for evicted or reordered caches; the head axis is 1
    unless the keys' positions differ per head. Only the query rows [start, stop) are built (all
    rows by default): callers that need a few rows, or walk the queries in chunks, never
    materialise the whole Lq x Lk mask.
    """
    stop = ctx.q_len if stop is None else stop
    qp = query_positions(ctx)[start:stop][:, None]  # (rows, 1)
    kp = key_positions(ctx)[:, :, None, :]  # (B or 1, Hp, 1, Lk)
    mask = kp <= qp  # (B or 1, Hp, rows, Lk)
    if ctx.sliding_window is not None:
        mask = mask & (qp - kp < ctx.sliding_window)
    if ctx.key_valid is not None:
        mask = mask & ctx.key_valid[:, None, None, :]
    mask = heads_to_query_heads(mask, ctx)
    return mask.expand(ctx.batch, -1, -1, -1)


def expand_blocks(
    block_mask: torch.Tensor, block_size: int, q_len: int, kv_len: int
) -> torch.Tensor:
    """(B, H, nQ, nK) bool -> (B, H, Lq, Lk) bool, every tile broadcast to its tokens."""
    tokens = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return tokens[..., :q_len, :kv_len]


@dataclass
class BlockLayout:
    """Block-level view of the base mask for one call and one block size.

    ``counts[b, i, j]`` is the number of visible (query, key) pairs inside tile (i, j); computed
    from prefix sums of valid keys in O(B * Lq * nK), never as an Lq x Lk matrix. ``shared``
    holds what the layers of one forward derive from the same call shape: static selections
    and the BlockMasks built from them.
    """

    ctx: AttentionContext
    block_size: int
    shared: dict = field(default_factory=dict, repr=False, compare=False)  # per-shape products

    def __post_init__(self) -> None:
        if not self.ctx.contiguous:
            raise ValueError(
                "BlockLayout needs contiguous key positions; a call over an evicted cache layer "
                "runs through the position-aware dense or decode paths"
            )

    @property
    def n_q_blocks(self) -> int:
        return num_blocks(self.ctx.q_len, self.block_size)

    @property
    def n_kv_blocks(self) -> int:
        return num_blocks(self.ctx.kv_len, self.block_size)

    @cached_property
    def counts(self) -> torch.Tensor:
        """(B, nQ, nK) int64 visible pairs per tile."""
        ctx, b = self.ctx, self.block_size
        dev = ctx.device
        qp = query_positions(ctx)  # (Lq,)
        # Visible keys of query p, as local key indices: [lo, hi)
        hi = (qp - ctx.kv_offset + 1).clamp(0, ctx.kv_len)  # (Lq,)
        lo = torch.zeros_like(hi)
        if ctx.sliding_window is not None:
            lo = (qp - ctx.sliding_window + 1 - ctx.kv_offset).clamp(0, ctx.kv_len)
        starts = torch.arange(self.n_kv_blocks, device=dev) * b  # (nK,)
        ends = (starts + b).clamp(max=ctx.kv_len)
        a = torch.maximum(lo[:, None], starts[None, :])  # (Lq, nK)
        z = torch.minimum(hi[:, None], ends[None, :])
        z = torch.maximum(z, a)
        if ctx.key_valid is None:
            per_query = (z - a)[None].expand(ctx.batch, -1, -1)  # (B, Lq, nK)
        else:
            csum = torch.zeros(ctx.batch, ctx.kv_len + 1, dtype=torch.long, device=dev)
            csum[:, 1:] = ctx.key_valid.long().cumsum(-1)  # (B, Lk + 1)
            flat_z = z.reshape(1, -1).expand(ctx.batch, -1)
            flat_a = a.reshape(1, -1).expand(ctx.batch, -1)
            per_query = (csum.gather(1, flat_z) - csum.gather(1, flat_a)).view(
                ctx.batch, ctx.q_len, -1
            )
        pad = self.n_q_blocks * b - ctx.q_len
        per_query = torch.nn.functional.pad(per_query, (0, 0, 0, pad))
        return per_query.view(ctx.batch, self.n_q_blocks, b, -1).sum(2)  # (B, nQ, nK)

    @cached_property
    def visible(self) -> torch.Tensor:
        """(B, nQ, nK) bool: tile holds at least one visible pair."""
        return self.counts > 0

    @cached_property
    def full(self) -> torch.Tensor:
        """(B, nQ, nK) bool: every pair of a complete b x b tile is visible (no mask needed)."""
        return self.counts == self.block_size * self.block_size

    @cached_property
    def diagonal(self) -> torch.Tensor:
        """(nQ, nK) bool: key tiles holding the queries' own positions."""
        ctx, b = self.ctx, self.block_size
        own = query_positions(ctx) - ctx.kv_offset  # (Lq,) local index of each query's own key
        own_block = own.clamp(0, ctx.kv_len - 1) // b
        q_block = torch.arange(ctx.q_len, device=ctx.device) // b
        diag = torch.zeros(self.n_q_blocks, self.n_kv_blocks, dtype=torch.bool, device=ctx.device)
        diag[q_block, own_block] = True
        return diag

    def finalize(self, mask: torch.Tensor) -> BlockSelection:
        """Keep the diagonal, drop invisible tiles: the selection a backend will run.

        Args:
            mask: (B, H, nQ, nK) bool, a method's raw choice of tiles.
        """
        mask = (mask | self.diagonal) & self.visible[:, None]
        return BlockSelection(mask=mask, block_size=self.block_size)

    def every_tile(self, num_heads: int) -> BlockSelection:
        """The selection that keeps every visible tile (a method's dense limit)."""
        every = torch.ones(
            self.ctx.batch,
            num_heads,
            self.n_q_blocks,
            self.n_kv_blocks,
            dtype=torch.bool,
            device=self.ctx.device,
        )
        return self.finalize(every)

    def density(self, selection: BlockSelection) -> tuple[torch.Tensor, torch.Tensor]:
        """Computed and visible pair counts per (B, H): the measured density is their ratio.

        Returns:
            computed: (B, H) float64 pairs inside selected tiles.
            visible: (B, H) float64 pairs of the dense base mask.
        """
        counts = self.counts[:, None].to(torch.float64)  # (B, 1, nQ, nK)
        computed = (counts * selection.mask).sum((-1, -2))
        visible = counts.sum((-1, -2)).expand_as(computed)
        return computed, visible

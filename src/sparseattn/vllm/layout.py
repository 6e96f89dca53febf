"""vLLM's paged KV cache as sparseattn's per-sequence tensors: pure functions, no vLLM import.

vLLM (V1) runs one attention call per layer over a flat batch of new tokens from several
sequences. Its metadata says where each sequence's queries sit in the batch
(``query_start_loc``, (N + 1,)), how many tokens each sequence holds after this step
(``seq_lens``, (N,)), and which physical cache blocks hold them (``block_table``,
(N, max blocks)): token p of sequence i lives in block ``block_table[i, p // bs]`` at offset
``p % bs``. The CPU backend stores keys and values as (num_blocks, Hkv, bs, D) each.

Shape letters: T new tokens of the batch, N sequences, nb cache blocks, bs block size,
P page size (tokens of one page; divides bs), S = bs / P pages per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class BatchLayout:
    """Host view of one forward's batch: where each sequence's queries are and what it sees.

    Attributes:
        query_start: (N + 1) offsets of each sequence's new tokens in the flat batch.
        seq_lens: (N) tokens each sequence holds after this step (its new tokens included).
    """

    query_start: tuple[int, ...]
    seq_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.query_start) != len(self.seq_lens) + 1:
            raise ValueError(
                f"query_start has {len(self.query_start)} entries for {len(self.seq_lens)} "
                "sequences; expected one more"
            )
        for i, (q_len, seq_len) in enumerate(zip(self.q_lens, self.seq_lens)):
            if q_len < 0 or q_len > seq_len:
                raise ValueError(f"sequence {i}: {q_len} new tokens but seq_len {seq_len}")

    @classmethod
    def from_tensors(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> BatchLayout:
        """From vLLM's host tensors (``query_start_loc_cpu``, ``seq_lens_cpu``)."""
        return cls(tuple(query_start_loc.tolist()), tuple(seq_lens.tolist()))

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @cached_property
    def q_lens(self) -> tuple[int, ...]:
        """New tokens (queries) of each sequence."""
        return tuple(b - a for a, b in zip(self.query_start, self.query_start[1:]))

    @cached_property
    def q_offsets(self) -> tuple[int, ...]:
        """Absolute position of each sequence's first new token (tokens computed before)."""
        return tuple(s - q for s, q in zip(self.seq_lens, self.q_lens))

    def is_decode(self, i: int) -> bool:
        """One new token after a computed prefix (a 1-token prompt is a prefill)."""
        return self.q_lens[i] == 1 and self.q_offsets[i] > 0

    @cached_property
    def decodes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_seqs) if self.is_decode(i))

    @cached_property
    def prefills(self) -> tuple[int, ...]:
        """Sequences with prompt tokens this step (a whole prompt or a later chunk)."""
        return tuple(
            i for i in range(self.num_seqs) if self.q_lens[i] > 0 and not self.is_decode(i)
        )

    def token_index(self, seqs: tuple[int, ...] | list[int]) -> list[int]:
        """Flat batch positions of the new tokens of ``seqs``, in their order."""
        return [t for i in seqs for t in range(self.query_start[i], self.query_start[i + 1])]


def sequence_slots(block_row: torch.Tensor, start: int, stop: int, block_size: int) -> torch.Tensor:
    """(stop - start,) long cache slots (block * bs + offset) of positions [start, stop).

    Args:
        block_row: (max blocks,) the sequence's row of the block table.
    """
    positions = torch.arange(start, stop, device=block_row.device)
    return block_row[positions // block_size].long() * block_size + positions % block_size


def gather_sequence(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """(1, Hkv, length, D) the first ``length`` tokens of one sequence, read from its blocks.

    Args:
        cache: (nb, Hkv, bs, D) the key (or value) cache of one layer.
        block_row: (max blocks,) the sequence's row of the block table.
        length: Tokens to read (the sequence's length after this step).
    """
    _, Hkv, bs, D = cache.shape
    n = -(-length // bs)
    blocks = cache.index_select(0, block_row[:n].long())  # (n, Hkv, bs, D)
    return blocks.transpose(0, 1).reshape(Hkv, n * bs, D)[None, :, :length]


def write_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` (T, Hkv, D) at cache ``slots`` (T,): the layout vLLM's CPU backend
    writes (what ``reshape_and_cache`` does), for building paged caches by hand."""
    bs = cache.shape[2]
    cache[slots // bs, :, slots % bs] = values.to(cache.dtype)


def page_slots(
    block_table: torch.Tensor, pages: torch.Tensor, block_size: int, page_size: int
) -> torch.Tensor:
    """(N, H, n) long first cache slot of logical pages ``pages`` (N, H, n) of each sequence.

    Logical page p of a sequence holds its positions [p * P, (p + 1) * P) (P divides bs), so
    it lies inside block ``block_table[i, p * P // bs]`` at offset ``p * P % bs``.
    """
    start = pages * page_size  # (N, H, n) first position of each page
    rows = block_table.long().gather(1, (start // block_size).flatten(1)).view_as(start)
    return rows * block_size + start % block_size


def channel_major(cache: torch.Tensor) -> bool:
    """Whether ``cache`` (nb, Hkv, bs, D) keeps each channel's bs tokens contiguous (vLLM's CPU
    key cache under its ``vec`` / ``vec16`` kernels: a (block, head) is K transposed, (D, bs))
    rather than each token's D channels (its value cache; a plain tensor)."""
    return cache.stride(2) == 1 and cache.stride(3) == cache.shape[2]


def _row_view(cache: torch.Tensor, width: int) -> tuple[torch.Tensor, int, int]:
    """A (R, width) view of the storage under ``cache`` (nb, Hkv, bs, D), and the strides, in
    rows, of its block and head axes. A row holds ``width`` consecutive elements: whole tokens
    (P x D) where tokens are contiguous, P tokens of one channel where channels are
    (``channel_major``). Copies only a cache laid out neither way."""
    nb, H, bs, D = cache.shape
    if not channel_major(cache) and (cache.stride(3) != 1 or cache.stride(2) != D):
        cache = cache.contiguous()
    s0, s1 = cache.stride(0), cache.stride(1)
    if s0 % width or s1 % width or (bs * D) % width:  # a copy keeping the inner layout
        major = channel_major(cache)
        cache = cache.transpose(2, 3).contiguous().transpose(2, 3) if major else cache.contiguous()
        s0, s1 = cache.stride(0), cache.stride(1)
    span = (nb - 1) * s0 + (H - 1) * s1 + bs * D  # elements from the first to past the last
    view = torch.as_strided(cache, (span // width, width), (width, 1))
    return view, s0 // width, s1 // width


def gather_pages(
    cache: torch.Tensor,
    first_slots: torch.Tensor,
    heads: torch.Tensor,
    page_size: int,
    transposed: bool = False,
) -> torch.Tensor:
    """(N, Hs, n * P, D) the P tokens starting at each of ``first_slots`` (N, Hs, n) (a page:
    P divides bs and the first slot is a multiple of P, so it never crosses a block) of KV
    head ``heads`` (Hs,), read with one ``index_select`` on a view of the cache's storage:
    one row of P * D per page when tokens are contiguous, D rows of P when channels are.

    Args:
        transposed: Return (N, Hs, D, n * P) instead (keys ready for q @ K^T); from a
            channel-major cache this is the gather's own order, with no transposing copy.
    """
    bs, D = cache.shape[2], cache.shape[3]
    P = page_size
    N, Hs, n = first_slots.shape
    if channel_major(cache):
        flat, per_block, per_head = _row_view(cache, P)
        base = (first_slots // bs) * per_block + heads[None, :, None] * per_head
        rows = base + (first_slots % bs) // P  # (N, Hs, n) the page's row of channel 0
        channel = torch.arange(D, device=rows.device) * (bs // P)  # (D,) rows between channels
        if transposed:
            rows = rows[:, :, None, :] + channel[:, None]  # (N, Hs, D, n)
            return flat.index_select(0, rows.flatten()).view(N, Hs, D, n * P)
        rows = rows[..., None] + channel  # (N, Hs, n, D)
        pages = flat.index_select(0, rows.flatten()).view(N, Hs, n, D, P)
        return pages.transpose(-1, -2).reshape(N, Hs, n * P, D)
    flat, per_block, per_head = _row_view(cache, P * D)
    rows = (first_slots // bs) * per_block + heads[None, :, None] * per_head
    rows = rows + (first_slots % bs) // P  # (N, Hs, n)
    pages = flat.index_select(0, rows.flatten()).view(N, Hs, n * P, D)
    return pages.transpose(-1, -2) if transposed else pages


def touched_pages(layout: BatchLayout, page_size: int) -> tuple[list[int], list[int], list[int]]:
    """The pages this step writes: (sequence, logical page, tokens the page holds after it).

    A sequence writing positions [q_offset, seq_len) touches pages q_offset // P ..
    (seq_len - 1) // P; every page but its last is then full.
    """
    seqs, pages, fill = [], [], []
    P = page_size
    for i, (start, stop) in enumerate(zip(layout.q_offsets, layout.seq_lens)):
        if stop == start:
            continue
        for p in range(start // P, (stop - 1) // P + 1):
            seqs.append(i)
            pages.append(p)
            fill.append(min(P, stop - p * P))
    return seqs, pages, fill


def cache_views(
    kv_cache: torch.Tensor, key_channel_major: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value caches, each a (nb, Hkv, bs, D) view (no copy) in logical order
    (``[block, head, token, channel]``), of one layer's vLLM 0.32 CPU buffer (nb, Hkv, bs, 2D).

    vLLM reads that buffer as (nb, Hkv, 2 bs, D): per (block, head), bs rows of keys then bs
    rows of values. Its ``vec`` / ``vec16`` kernels store the keys of a (block, head)
    transposed, (D, bs) (``key_channel_major``); the values are (bs, D).
    """
    nb, Hkv, bs, _ = kv_cache.shape
    key_rows, value_cache = kv_cache.view(nb, Hkv, 2 * bs, -1).chunk(2, dim=2)
    if not key_channel_major:
        return key_rows, value_cache
    s0, s1 = key_rows.stride(0), key_rows.stride(1)
    D = key_rows.shape[-1]
    key_cache = torch.as_strided(key_rows, (nb, Hkv, bs, D), (s0, s1, 1, bs))
    return key_cache, value_cache

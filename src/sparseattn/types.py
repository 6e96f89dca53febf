"""Core value types shared by methods, backends and the transformers integration.

Shape letters: B batch, Hq query heads, Hkv key/value heads, Lq query length, Lk key length,
D head dim, b block size, nQ = ceil(Lq / b), nK = ceil(Lk / b).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

EMPTY_POSITION = 2**62  # position of an empty or padded cache slot: never visible to any query


class Phase(str, Enum):
    """Which part of inference an attention call belongs to."""

    PREFILL = "prefill"  # first chunk of the prompt: query positions start at 0
    CHUNKED_PREFILL = "chunked_prefill"  # a later prompt chunk: q_len > 1 with a KV prefix
    DECODE = "decode"  # one new token attends to the cache

    @property
    def is_prefill(self) -> bool:
        return self is not Phase.DECODE


@dataclass(frozen=True)
class AttentionContext:
    """Everything a method or backend needs to know about one attention call.

    Positions are absolute cache indices (padding included): query i sits at ``q_offset + i``.
    Key j sits at ``kv_offset + j`` while a layer holds a contiguous run of keys
    (``key_positions`` is None, the cheap form); once a cache layer has evicted or reordered
    entries it sits at ``key_positions[b, h, j]``. A key is visible to a query when it is not in
    the future, lies inside the layer's own sliding window (if any), and is not padding. Every
    rule is computed from positions, never from the index j.

    Attributes:
        layer_idx: Index of the decoder layer.
        phase: Prefill, chunked prefill or decode.
        batch: B.
        q_len: Lq.
        kv_len: Lk.
        q_offset: Absolute position of the first query.
        kv_offset: Absolute position of the first key (non-zero for sliding-window caches).
        num_q_heads: Hq.
        num_kv_heads: Hkv.
        scaling: Softmax scale applied to q.k.
        sliding_window: The layer's own window (query sees keys with q - k < window) or None.
        softcap: Logit soft-capping (Gemma 2) or None.
        key_valid: (B, Lk) bool, False where the key is padding; None when nothing is padded.
        key_positions: (B, 1 or Hkv, Lk) long absolute position of every held key, or None when
            key j sits at ``kv_offset + j``. Empty or padded slots hold ``EMPTY_POSITION`` (in
            the future of every query, so never visible).
        device: Device of the call's tensors.
        key_bias: (B, 1, Lk) float added to every query's logit of each key (a compensation
            token standing for m dropped tokens carries log m), or None.
        row_start: (B,) long absolute position of each row's first valid (non-padding) token,
            or None when the call knows of no padding (every row starts at position 0). A
            row's attention sink is its first valid positions, so under left padding it moves
            with the row; ``backends.masks.row_starts`` also derives it from ``key_valid``.
    """

    layer_idx: int
    phase: Phase
    batch: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_offset: int
    num_q_heads: int
    num_kv_heads: int
    scaling: float
    sliding_window: int | None = None
    softcap: float | None = None
    key_valid: torch.Tensor | None = field(default=None, repr=False)
    key_positions: torch.Tensor | None = field(default=None, repr=False)
    device: torch.device = field(default=torch.device("cpu"), repr=False)
    key_bias: torch.Tensor | None = field(default=None, repr=False)
    row_start: torch.Tensor | None = field(default=None, repr=False)

    @property
    def groups(self) -> int:
        """GQA group size g = Hq / Hkv."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def contiguous(self) -> bool:
        """True when key j sits at ``kv_offset + j`` (no eviction, no reordering)."""
        return self.key_positions is None


@dataclass(frozen=True)
class BlockSelection:
    """Which (query block, key block) tiles to compute.

    Attributes:
        mask: (B, Hq, nQ, nK) bool; True = compute this tile. Block (i, j) covers queries
            [i*b, (i+1)*b) of the query tensor and keys [j*b, (j+1)*b) of the key tensor.
            Tiles are further restricted at token level by causality, the layer's window and
            padding, so a selection never makes a future or padded key visible.
        block_size: b.
        static: The tiles depend on the call's shape only (never on q or k), so every layer
            of a forward may reuse this object, and a backend may cache what it derives from
            it (a BlockMask) with the layout.
    """

    mask: torch.Tensor
    block_size: int
    static: bool = False

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.dim() != 4:
            raise ValueError(
                f"BlockSelection.mask must be a 4-D bool tensor (B, H, nQ, nK), got "
                f"dtype={self.mask.dtype} shape={tuple(self.mask.shape)}"
            )


@dataclass(frozen=True)
class PageSelection:
    """Which pages of the cache one decode query reads: a fixed budget of page indices.

    Page p holds cache slots [p * page_size, (p + 1) * page_size) of the key tensor. The number
    of pages is static (known from the budget), so executing it is one gather, never a sort.

    Attributes:
        pages: (B, Hkv or Hq, n) long page indices; with Hkv rows the query heads of a GQA
            group share their KV head's pages.
        valid: (B, Hkv or Hq, n) bool, False for padding entries (a row may hold fewer pages).
        page_size: Slots per page.
        tail: Slots [start, stop) every row also reads, contiguously, after its pages (the
            page being written, which ``pages`` then never holds), or None.
        all_valid: Every entry of ``valid`` is True (known without reading it).
    """

    pages: torch.Tensor
    valid: torch.Tensor
    page_size: int
    tail: tuple[int, int] | None = None
    all_valid: bool = False


@dataclass(frozen=True)
class TokenSelection:
    """Which cached tokens each head reads during decode: a fixed number of slot indices.

    Attributes:
        indices: (B, Hkv or Hq, K) long slot indices into the key tensor.
        valid: (B, Hkv or Hq, K) bool, False for padding entries (rows hold different counts).
        all_valid: Every entry of ``valid`` is True and every index a visible slot (known
            without reading them).
    """

    indices: torch.Tensor
    valid: torch.Tensor
    all_valid: bool = False


@dataclass
class DecodeView:
    """What a decode method sees of one cache layer at one step.

    Attributes:
        keys: (B, Hkv, Lk, D) the held keys in slot order (a view of the cache, never a copy).
        state: Per-layer, per-sequence state of decode methods (Quest page bounds, label
            caches ...): created on first use after the prefill, updated as tokens are
            appended, dropped with the cache (and whenever the layer compacts). Keyed by the
            method's ``state_key``.
        writes: Updates the layer has received so far; state records the count it has seen,
            so a method knows whether it missed an update and must rebuild.
        last_write: Slots [start, stop) written by the latest update ((0, 0) after a compaction).
        rewritten: Other slots [start, stop) whose keys the latest update changed in place (the
            sinks of a re-rotating ring layer, moved next to the window each step); state
            derived from keys refreshes them too.
        seen: Tokens the layer has seen (the query's position + 1); equal across the layers of
            one decode step, so it names the step.
        shared: State shared by the layers of one cache (a selection made by one layer and
            reused by the next ones, as TidalDecode and DELTA do); dropped with the cache.
        counters: Device-side counters of the run (``count`` adds to them; ``last_stats``
            reports them), for what a method wants to report (cache hits, recall ...).
    """

    keys: torch.Tensor
    state: dict = field(default_factory=dict)
    writes: int = 0
    last_write: tuple[int, int] = (0, 0)
    seen: int = 0
    shared: dict = field(default_factory=dict)
    counters: dict = field(default_factory=dict)
    rewritten: tuple[int, int] = (0, 0)

    def count(self, name: str, value: torch.Tensor | float) -> None:
        """Add ``value`` to the counter ``name`` (a device tensor stays on the device: no sync)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float64).sum()
        self.counters[name] = self.counters.get(name, 0.0) + value


Selection = BlockSelection | PageSelection | TokenSelection
"""The one selection type backends accept: tiles (prefill), pages or tokens (decode)."""

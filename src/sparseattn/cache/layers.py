"""The full cache layer: every token, until an eviction policy compacts it to a kept set.

Keys and values live in a preallocated buffer ``(B, Hkv, capacity, D)`` written in place at the
next free slot (gpt-fast style), so a decode step copies one token per layer instead of
concatenating the whole cache. The layer knows the tokens it has seen (the next RoPE position,
``get_seq_length``) apart from the slots it holds (what attention sees). It is in one of two
states:

- *full*: every token, slot j holds position j (``positions`` is None, the cheap form);
- *compacted*: after an eviction policy kept a subset per KV head (``retain``), each slot's
  position is explicit per (row, head); heads that keep fewer tokens have empty slots
  (``EMPTY_POSITION``) until decode appends fill the common width.

A policy turns a full layer into a compacted one in place (the same object transformers holds),
so these are two states of one class. The third kind, a sink + ring window that never holds
more than it keeps, is ``RingLayer`` (cache/ring.py), built on this one. Attention never relies
on slot order: softmax does not care, and every visibility rule is computed from positions.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import compat
from ..types import EMPTY_POSITION
from .storage import allocate, gather_slots, grown_capacity, round_up, state_nbytes


class KVLayer(CacheLayerMixin):
    """A full cache layer holding keys/values in place, with explicit positions once compacted.

    Args:
        page_size: Storage is allocated in whole pages so a page view of it is free.
    """

    is_compileable = False
    is_croppable = False

    bounded = False  # holds every token it is given (a RingLayer is bounded)
    window: int | None = None  # a RingLayer's window; None here
    sink = 0
    is_sliding = False  # transformers reads these two
    sliding_window: int | None = None
    rotation = None  # a RingLayer may re-rotate its sinks
    extra_slots = 0  # slots a subclass keeps after the sink + window (a compensation token)

    def __init__(self, *, page_size: int = 16) -> None:
        super().__init__()
        self.page_size = page_size
        self.origin: tuple = ("full",)  # what built it
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0  # tokens seen: the next position
        self.width = 0  # slots in use by the sink and the window (or every token)
        self.extra_held = 0  # extra slots published after them (0 or extra_slots)
        self.positions: torch.Tensor | None = None  # (B, 1 or Hkv, capacity) long
        self.padded = False  # contiguous layers: some held key is padding (read from the mask)
        self.holes = False  # some slot in use holds EMPTY_POSITION
        self.writes = 0  # updates so far; decode state compares it to know what it missed
        self.last_write: tuple[int, int] = (0, 0)  # slots [start, stop) of the latest update
        self.rewritten: tuple[int, int] = (0, 0)  # other slots it changed (re-rotated sinks)
        self.state: dict[str, Any] = {}  # decode-method state of this layer, per sequence
        self.padding_tokens: torch.Tensor | None = None  # (B,) padding of the first call
        self._buf_k = self._buf_v = None
        self._call: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._pending = False  # the latest call awaits compaction (a ring that overflowed)
        self._contiguous_call = False  # that call is a first prompt: its keys sit at 0..n-1
        self._marked = False  # padding was emptied in this call: finish_call recounts holes
        self._call_valid: torch.Tensor | None = None  # (B, Lk) padding of this call's keys

    # -- what transformers calls ---------------------------------------------------------
    @property
    def slots(self) -> int | None:
        """Slots a bounded layer keeps (sink + window); None for a full layer."""
        return None

    @property
    def capacity(self) -> int:
        return 0 if self._buf_k is None else self._buf_k.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self._allocate(B, H, D, value_states.shape[-1], self._first_capacity())
        self.is_initialized = True

    def _first_capacity(self) -> int:
        return self.page_size  # grown in proportion by the first update

    def _allocate(self, B: int, H: int, D: int, Dv: int, capacity: int) -> None:
        self._buf_k, self._buf_v = allocate(B, H, D, Dv, capacity, self.dtype, self.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens; return the keys and values this call attends to.

        Args:
            key_states: (B, Hkv, n, D) new keys (RoPE applied at their positions).
            value_states: (B, Hkv, n, Dv).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending:  # the previous call ran outside our attention hook: compact now
            self.finish_call()
        n = key_states.shape[2]
        self._call_valid = None
        first = self.seen
        self.seen += n
        self.writes += 1
        self.rewritten = (0, 0)
        new_positions = torch.arange(first, first + n, device=self.device)
        return self._place(key_states, value_states, new_positions)

    def _place(
        self, key_states: torch.Tensor, value_states: torch.Tensor, new_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens after the held ones (growing in proportion); publish."""
        n = key_states.shape[2]
        if self.width + n > self.capacity:
            self._grow(grown_capacity(self.width + n, self.page_size))
        slot = self.width
        self.width += n
        self._write(slot, key_states, value_states, new_positions)
        return self._publish()

    def _write(self, slot: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        n = k.shape[2]
        self._buf_k[:, :, slot : slot + n] = k
        self._buf_v[:, :, slot : slot + n] = v
        if self.positions is not None:
            self.positions[:, :, slot : slot + n] = pos
        self.last_write = (slot, slot + n)

    def _publish(self) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.width + self.extra_held
        self.keys = self._buf_k[:, :, :held]
        self.values = self._buf_v[:, :, :held]
        positions = None if self.positions is None else self.positions[:, :, :held]
        self._call = (self.keys, self.values, positions)
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        B, H, _, D = self._buf_k.shape
        old_k, old_v = self._buf_k, self._buf_v
        self._allocate(B, H, D, old_v.shape[-1], capacity)
        self._buf_k[:, :, : self.width] = old_k[:, :, : self.width]
        self._buf_v[:, :, : self.width] = old_v[:, :, : self.width]
        if self.positions is not None:
            grown = torch.full(
                (*self.positions.shape[:2], capacity),
                EMPTY_POSITION,
                dtype=torch.long,
                device=self.device,
            )
            grown[:, :, : self.width] = self.positions[:, :, : self.width]
            self.positions = grown

    # -- what our attention hook reads ---------------------------------------------------
    def call_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and explicit positions (None: slot j holds position j) of this call."""
        if self._contiguous_call and self._pending:
            return self._call[0], self._call[1], None
        return self._call

    def key_bias(self) -> torch.Tensor | None:
        """(B, 1, held) logit bias per held key, or None (only a compensation token has one)."""
        return None

    def all_visible_at_decode(self) -> bool:
        """True when a decode query sees every held slot (no padding, no holes, window kept)."""
        return not (self.padded or self.holes or self._pending or self._marked)

    def prefix_precedes_call(self) -> bool:
        """True when a prompt chunk may run over this layer as if its keys were contiguous:
        every slot before the chunk's own keys holds a key (no holes, no padding), all of them
        earlier than the chunk, and the chunk's keys follow in order. Attention then only needs
        "the held prefix is visible to every query, the chunk is causal", which is the mask of
        a contiguous chunk whose keys start ``held`` positions before it. (The model's sliding
        window and a compensation token's bias depend on more than order: the caller checks
        those on the call.)"""
        return not (self.holes or self._marked or self.padded)

    def mark_padding(self, key_valid: torch.Tensor) -> None:
        """Before attention on a prefill call: keys where ``key_valid`` is False are padding.

        Contiguous layers remember that they hold padding (attention reads it from the mask);
        layers with explicit positions empty those slots (EMPTY_POSITION), so padding is never
        kept by a bounded layer and never visible.

        Args:
            key_valid: (B, Lk) bool over this call's keys.
        """
        self._call_valid = key_valid
        _, _, positions = self._call  # explicit even when the call is seen as contiguous
        if positions is None:
            self.padded = True
            return
        positions.masked_fill_(~key_valid[:, None, :], EMPTY_POSITION)
        self._marked = True

    def finish_call(self) -> None:
        """After attention: count the empty slots a call's padding left (a ring also compacts).

        Runs on every call but does work only after a prefill chunk (where a host sync is
        allowed), never on a decode token that fit in place.
        """
        if not (self._pending or self._marked):
            return
        self._compact()
        self._marked = False
        held = self.width + self.extra_held
        self.holes = bool((self.positions[:, :, :held] == EMPTY_POSITION).any())

    def _compact(self) -> None:
        """What a layer does with a call once attended (a full layer keeps it whole)."""

    # -- eviction ----------------------------------------------------------------------
    def retain(self, slots: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Keep only ``slots`` per (row, KV head), in that order; memory is really freed.

        Called by an eviction policy after a prefill call (a host sync is allowed). Padding of
        that call is never kept: a padded slot becomes empty.

        Args:
            slots: (B, Hkv, C) long slot indices into the held keys.
            valid: (B, Hkv, C) bool, False where a head keeps fewer than C tokens (an empty
                slot: no key is stored there, its position is EMPTY_POSITION).
        """
        keys, values, positions = self._call
        B, H, C = slots.shape
        capacity = round_up(C + 1, self.page_size)  # later appends grow it in proportion
        take = torch.nn.functional.pad(slots, (0, capacity - C))
        self._buf_k, self._buf_v = gather_slots(keys, values, take)
        if positions is None:
            positions = torch.arange(keys.shape[2], device=keys.device).expand(B, H, -1)
        kept = positions.expand(B, H, -1).gather(-1, take)
        filled = (torch.arange(capacity, device=keys.device) < C).expand(B, H, -1)
        if valid is not None:
            filled = filled & torch.nn.functional.pad(valid, (0, capacity - C))
        if self._call_valid is not None:  # the call's padding: never kept
            not_pad = self._call_valid[:, None, :].expand(B, H, -1).gather(-1, take)
            filled = filled & not_pad
        self.positions = torch.where(filled, kept, EMPTY_POSITION)
        self.holes = bool((~filled[..., :C]).any())
        self.padded = False  # padding is now empty slots
        self.width, self._pending = C, False
        self.state.clear()
        self._publish()

    # -- bookkeeping -------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this layer allocates: KV storage (held slots and headroom), explicit positions,
        sink copies and every decode-method state it carries (page bounds, label caches, ANN
        indexes)."""
        tensors = [self._buf_k, self._buf_v, self.positions, self.padding_tokens]
        own = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return own + state_nbytes(self.state)

    def held_nbytes(self) -> int:
        """Bytes of the keys and values of the tokens held (no headroom, no empty slots)."""
        if self._buf_k is None:
            return 0
        B, H, _, D = self._buf_k.shape
        per_token = (D + self._buf_v.shape[-1]) * self._buf_k.element_size()
        held = self.held_tokens()
        tokens = B * H * held if isinstance(held, int) else int(held.sum()) * H // held.shape[1]
        return tokens * per_token

    def kv_nbytes(self) -> int:
        """Bytes of the key/value storage alone."""
        return sum(
            t.numel() * t.element_size() for t in (self._buf_k, self._buf_v) if t is not None
        )

    def held_tokens(self) -> torch.Tensor | int:
        """Tokens held per (row, head): an int while nothing is empty, else (B, Hp) counts."""
        held = self.width + self.extra_held
        if self.positions is None or not self.holes:
            return held
        return (self.positions[:, :, :held] != EMPTY_POSITION).sum(-1)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        held = self.width + self.extra_held
        return held + compat.query_length(query_length), max(self.seen - held, 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.24

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        if self.positions is not None:
            raise ValueError("a layer that has evicted tokens cannot be cropped")
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of tokens to remove")
        self.width += tokens_to_remove
        self.seen += tokens_to_remove
        self.state.clear()
        self._publish()

    def _index_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._buf_k, self._buf_v = fn(self._buf_k), fn(self._buf_v)
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.padding_tokens is not None:
            self.padding_tokens = fn(self.padding_tokens)
        self.state.clear()
        if self.width and not self._pending:
            self._publish()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices])

    def offload(self):  # buffers stay where they are: views into them are what attention reads
        return None

    def prefetch(self):
        return None

    def __repr__(self) -> str:
        kind = "full" if self.positions is None else "compacted"
        return f"KVLayer({kind}, held={self.width}, seen={self.seen})"

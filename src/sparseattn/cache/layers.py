"""One cache layer that stores only what it keeps: full, bounded (sink + ring window) or compacted.

Keys and values live in a preallocated buffer ``(B, Hkv, capacity, D)`` written in place at the
next free slot (gpt-fast style), so a decode step copies one token per layer instead of
concatenating the whole cache. The layer knows the tokens it has seen (the next RoPE position,
``get_seq_length``) apart from the slots it holds (what attention sees):

- *full*: every token, slot j holds position j (``positions`` is None, the cheap form);
- *bounded*: ``sink`` first tokens plus a ring of the ``window`` most recent ones; the model's
  own sliding-window layers are bounded layers with ``sink=0``;
- *compacted*: after an eviction policy kept a subset per KV head (``retain``), each slot's
  position is explicit per (row, head); heads that keep fewer tokens have empty slots
  (``EMPTY_POSITION``) until decode appends fill the common width.

Attention never relies on slot order: softmax does not care, and every visibility rule is
computed from positions.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import compat
from ..types import EMPTY_POSITION
from .rope import RopeRotation

GROWTH_SHARE = 16  # a full layer that runs out of room grows by 1/16 of what it needs (>= a page)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def grown_capacity(needed: int, page_size: int) -> int:
    """Slots to allocate when a layer must hold ``needed``: the headroom is proportional to what
    it holds (1/16, at least one page), so appends copy the layer O(log n) times and a long
    prompt never carries a fixed block of spare slots per layer."""
    return round_up(needed + max(page_size, needed // GROWTH_SHARE), page_size)


class KVLayer(CacheLayerMixin):
    """A cache layer holding keys/values in place, with explicit positions once it forgets.

    Args:
        window: None for a full layer; else the number of most recent tokens kept.
        sink: First tokens kept besides the window (bounded layers only).
        sliding: True for the model's own sliding-window layers (transformers reads ``is_sliding``).
        page_size: Storage is allocated in whole pages so a page view of it is free.
        rotation: Re-rotates the sink keys next to the window at every step (StreamingLLM's
            positions-inside-the-cache scheme); None keeps original positions.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        *,
        window: int | None = None,
        sink: int = 0,
        sliding: bool = False,
        page_size: int = 16,
        rotation: RopeRotation | None = None,
    ) -> None:
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"KVLayer window={window} must be >= 1 (or None for a full layer)")
        self.window = window
        self.sink = sink if window is not None else 0
        self.is_sliding = sliding
        self.sliding_window = window if sliding else None
        self.page_size = page_size
        self.rotation = rotation
        self.origin: tuple = ("sliding", window) if sliding else ("full",)  # what built it
        self._clear()

    extra_slots = 0  # slots a subclass keeps after the sink + window (a compensation token)

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0  # tokens seen: the next position
        self.width = 0  # slots in use by the sink and the window (or every token)
        self.extra_held = 0  # extra slots published after them (0 or extra_slots)
        self.cursor = 0  # next ring slot to overwrite, counted from the sink
        self.positions: torch.Tensor | None = None  # (B, 1 or Hkv, capacity) long
        self.sink_keys: torch.Tensor | None = None  # (B, Hkv, sink, D) as rotated at their position
        self.padded = False  # contiguous layers: some held key is padding (read from the mask)
        self.holes = False  # some slot in use holds EMPTY_POSITION
        self.writes = 0  # updates so far; decode state compares it to know what it missed
        self.last_write: tuple[int, int] = (0, 0)  # slots [start, stop) of the latest update
        self.rewritten: tuple[int, int] = (0, 0)  # other slots it changed (re-rotated sinks)
        self.state: dict[str, Any] = {}  # decode-method state of this layer, per sequence
        self.padding_tokens: torch.Tensor | None = None  # (B,) padding of the first call
        self._buf_k = self._buf_v = None
        self._call: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._pending = False  # the latest call overflowed a bounded layer: finish_call compacts
        self._contiguous_call = False  # that call is a first prompt: its keys sit at 0..n-1
        self._marked = False  # padding was emptied in this call: finish_call recounts holes
        self._call_valid: torch.Tensor | None = None  # (B, Lk) padding of this call's keys

    # -- what transformers calls ---------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self.window is not None

    @property
    def slots(self) -> int | None:
        """Slots a bounded layer keeps (sink + window); None for a full layer."""
        return None if self.window is None else self.sink + self.window

    @property
    def capacity(self) -> int:
        return 0 if self._buf_k is None else self._buf_k.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        slots = self.slots + self.extra_slots if self.bounded else 0
        self._allocate(B, H, D, value_states.shape[-1], round_up(max(slots, 1), self.page_size))
        if self.bounded:
            self.positions = torch.full(
                (B, 1, self.capacity), EMPTY_POSITION, dtype=torch.long, device=self.device
            )
        self.is_initialized = True

    def _allocate(self, B: int, H: int, D: int, Dv: int, capacity: int) -> None:
        self._buf_k = torch.zeros(B, H, capacity, D, dtype=self.dtype, device=self.device)
        self._buf_v = torch.zeros(B, H, capacity, Dv, dtype=self.dtype, device=self.device)

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
        if self.bounded and self.width + n > self.slots:
            if n == 1 and self.width == self.slots:
                slot = self.sink + self.cursor  # overwrite the oldest window token
                self.cursor = (self.cursor + 1) % self.window
                self._dropping(slot)
                self._write(slot, key_states, value_states, new_positions)
                self._rerotate_sink()
                return self._publish()
            kept = self.width + self.extra_held  # every held key (a compensation token too)
            keys = torch.cat([self._buf_k[:, :, :kept], key_states], 2)
            values = torch.cat([self._buf_v[:, :, :kept], value_states], 2)
            held = self.positions[:, :, :kept]
            positions = torch.cat([held, new_positions.expand(held.shape[0], held.shape[1], n)], 2)
            self._call, self._pending = (keys, values, positions), True
            # a first prompt into an empty layer holds positions 0..n-1: attention sees it as
            # contiguous keys (causal SDPA or tiles, not a masked L x L product); compaction
            # and padding still use the explicit positions
            self._contiguous_call = first == 0 and held.shape[2] == 0
            self.last_write = (0, 0)
            return keys, values
        if not self.bounded and self.width + n > self.capacity:
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

    def _dropping(self, slot: int) -> None:
        """The ring is about to overwrite ``slot`` (a subclass may keep what it held)."""

    def _dropped(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, gone: torch.Tensor
    ) -> None:
        """A compaction dropped the call's tokens where ``gone`` (B, N) is True.

        Args:
            keys: (B, Hkv, N, D) every key of the call; values likewise.
            positions: (B, N) their positions.
        """

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
        """After attention: compact a bounded layer that overflowed or holds padding.

        Runs on every call but does work only after a prefill chunk (where a host sync is
        allowed), never on a decode token that fit in place.
        """
        if not (self._pending or self._marked):
            return
        if self.bounded:
            self._compact()
        self._marked = False
        held = self.width + self.extra_held
        self.holes = bool((self.positions[:, :, :held] == EMPTY_POSITION).any())

    def _compact(self) -> None:
        """Keep, per row, the first ``sink`` and the last ``window`` tokens by position.

        Layout: the sink slots hold the first tokens left-aligned; the window slots hold the
        most recent ones right-aligned (empty slots first), so the ring cursor, starting at 0,
        always overwrites an empty slot or the oldest token.
        """
        keys, values, positions = self._call
        held_sinks = None if self.positions is None else self.positions[:, 0, : self.sink].clone()
        pos = positions[:, 0]  # (B, N): bounded layers share positions across heads
        order = pos.argsort(-1)
        pos = pos.gather(-1, order)
        valid = pos != EMPTY_POSITION
        rank = valid.long().cumsum(-1) - 1  # among valid tokens, oldest first
        count = valid.sum(-1, keepdim=True)
        in_sink = valid & (rank < self.sink)
        newest = count - 1 - rank  # 0 for the most recent token
        in_window = valid & ~in_sink & (newest < self.window)
        slots = self.slots
        dest = torch.where(in_sink, rank, self.sink + self.window - 1 - newest)
        dest = torch.where(in_sink | in_window, dest, slots)  # dropped -> a spare slot
        source = torch.full((pos.shape[0], slots + 1), -1, dtype=torch.long, device=self.device)
        source.scatter_(-1, dest, order)
        source = source[:, :slots]  # (B, slots) index into the call's keys, -1 = empty
        capacity = round_up(slots + self.extra_slots, self.page_size)
        source = torch.nn.functional.pad(source, (0, capacity - slots), value=-1)
        take = source.clamp_min(0)
        B, H, _, D = keys.shape
        self._buf_k = keys.gather(2, take[:, None, :, None].expand(B, H, capacity, D))
        self._buf_v = values.gather(
            2, take[:, None, :, None].expand(B, H, capacity, values.shape[-1])
        )
        self.positions = torch.where(source >= 0, positions[:, 0].gather(-1, take), EMPTY_POSITION)[
            :, None
        ]
        self.width, self.cursor, self._pending = slots, 0, False
        self._keep_sink_rotation(held_sinks)
        gone = torch.zeros_like(valid).scatter_(-1, order, valid & ~(in_sink | in_window))
        self._dropped(keys, values, positions[:, 0], gone)
        self.state.clear()
        self._publish()

    def _keep_sink_rotation(self, held_sinks: torch.Tensor | None) -> None:
        """After a compaction: keep the sinks' keys as first rotated, then move them next to
        the window.

        ``sink_keys`` always holds the sinks rotated at their own positions: a call that
        arrives after re-rotating decode steps holds them moved (they are the keys it attends
        to), so when the same tokens are still the sinks the earlier copy is kept, never the
        moved keys (re-rotating those would rotate them twice).
        """
        if self.rotation is None:
            self.sink_keys = None
            return
        same = (
            self.sink_keys is not None
            and held_sinks is not None
            and torch.equal(held_sinks, self.positions[:, 0, : self.sink])
        )
        if not same:
            self.sink_keys = self._buf_k[:, :, : self.sink].clone()
        self._rerotate_sink()

    def _rerotate_sink(self) -> None:
        """Move the sink keys' rotation next to the oldest window token (positions in the cache)."""
        if self.rotation is None or self.sink == 0:
            return
        if self.sink_keys is None:  # the layer filled up by appends: keep the sinks as written
            self.sink_keys = self._buf_k[:, :, : self.sink].clone()
        window_pos = self.positions[:, 0, self.sink : self.width]  # (B, window)
        oldest = window_pos.min(-1, keepdim=True).values  # (B, 1)
        target = oldest - self.sink + torch.arange(self.sink, device=self.device)  # (B, sink)
        delta = (target - self.positions[:, 0, : self.sink]).clamp(min=0)
        self._buf_k[:, :, : self.sink] = self.rotation.rotate(self.sink_keys, delta)
        self.rewritten = (0, self.sink)

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
        if self.bounded:
            raise ValueError("retain() acts on full layers; a bounded layer keeps sink + window")
        keys, values, positions = self._call
        B, H, C = slots.shape
        capacity = round_up(C + 1, self.page_size)  # later appends grow it in proportion
        take = torch.nn.functional.pad(slots, (0, capacity - C))
        D, Dv = keys.shape[-1], values.shape[-1]
        self._buf_k = keys.gather(2, take[..., None].expand(B, H, capacity, D))
        self._buf_v = values.gather(2, take[..., None].expand(B, H, capacity, Dv))
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
        self.width, self.cursor, self._pending = C, 0, False
        self.state.clear()
        self._publish()

    # -- bookkeeping -------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this layer allocates: KV storage (held slots and headroom), explicit positions,
        sink copies and every decode-method state it carries (page bounds, label caches, ANN
        indexes)."""
        tensors = [self._buf_k, self._buf_v, self.positions, self.sink_keys, self.padding_tokens]
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
        return -1 if self.slots is None else self.slots

    get_max_cache_shape = get_max_length  # its name before transformers 5.24

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        if self.bounded or self.positions is not None:
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
        if self.sink_keys is not None:
            self.sink_keys = fn(self.sink_keys)
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
        kind = "sliding" if self.is_sliding else "bounded" if self.bounded else "full"
        return f"KVLayer({kind}, held={self.width}, seen={self.seen})"


def state_nbytes(state: Any, seen: set[int] | None = None) -> int:
    """Bytes held by decode-method state: tensors, faiss indexes, and the containers and
    objects holding them (each object counted once)."""
    seen = set() if seen is None else seen
    if id(state) in seen:
        return 0
    seen.add(id(state))
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if type(state).__module__.startswith("faiss"):
        return faiss_nbytes(state)
    if isinstance(state, dict):
        return sum(state_nbytes(value, seen) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(value, seen) for value in state)
    if hasattr(state, "__dict__"):
        return state_nbytes(vars(state), seen)
    return 0


def faiss_nbytes(index: Any) -> int:
    """Bytes of a faiss index without serialising it: stored vectors (fp32), an id map's ids,
    an HNSW graph's neighbour lists, offsets and levels."""
    import faiss

    total = 0
    if hasattr(index, "id_map"):  # IndexIDMap: int64 ids around an inner index
        total += index.id_map.size() * 8
        index = faiss.downcast_index(index.index)
    total += index.ntotal * index.d * 4
    graph = getattr(index, "hnsw", None)
    if graph is not None:
        total += graph.neighbors.size() * 4 + graph.offsets.size() * 8 + graph.levels.size() * 4
    return total

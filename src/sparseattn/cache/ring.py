"""The bounded cache layer: a sink and a ring over the most recent tokens, nothing else.

The model's own sliding-window layers are rings with no sink; StreamingLLM eviction and the
streaming heads of the head-level policies are rings with a sink. A decode token overwrites the
oldest window slot in place; a multi-token call (a prompt chunk) is attended over every held key
and the new ones, then compacted back to sink + window (``finish_call``), so a ring never holds
more than its slots plus one call.
"""

from __future__ import annotations

import torch

from ..types import EMPTY_POSITION
from .layers import KVLayer
from .rope import RopeRotation
from .storage import gather_slots, round_up


class RingLayer(KVLayer):
    """``sink`` first tokens (per row, padding excluded) plus a ring of the ``window`` most recent.

    Args:
        window: Most recent tokens kept (>= 1).
        sink: First tokens kept besides the window.
        sliding: True for the model's own sliding-window layers (transformers reads
            ``is_sliding``).
        page_size: Storage is allocated in whole pages so a page view of it is free.
        rotation: Re-rotates the sink keys next to the window at every step (StreamingLLM's
            positions-inside-the-cache scheme); None keeps original positions.
    """

    bounded = True

    def __init__(
        self,
        *,
        window: int,
        sink: int = 0,
        sliding: bool = False,
        page_size: int = 16,
        rotation: RopeRotation | None = None,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"RingLayer window={window!r} must be an integer >= 1")
        self.window = window
        self.sink = sink
        self.is_sliding = sliding
        self.sliding_window = window if sliding else None
        self.rotation = rotation
        super().__init__(page_size=page_size)
        self.origin = ("sliding", window) if sliding else ("full",)

    def _clear(self) -> None:
        super()._clear()
        self.cursor = 0  # next ring slot to overwrite, counted from the sink
        self.sink_keys: torch.Tensor | None = None  # (B, Hkv, sink, D) rotated at their position

    @property
    def slots(self) -> int:
        """Slots the ring keeps: sink + window."""
        return self.sink + self.window

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B = key_states.shape[0]
        self.positions = torch.full(
            (B, 1, self.capacity), EMPTY_POSITION, dtype=torch.long, device=self.device
        )

    def _first_capacity(self) -> int:
        return round_up(self.slots + self.extra_slots, self.page_size)

    def _place(
        self, key_states: torch.Tensor, value_states: torch.Tensor, new_positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write in place while the ring has room; overwrite the oldest window slot for a decode
        token once full; hold a longer call as every held key plus the new ones (compacted after
        attention)."""
        n = key_states.shape[2]
        if self.width + n <= self.slots:
            return super()._place(key_states, value_states, new_positions)
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
        self._contiguous_call = self.seen == n and held.shape[2] == 0
        self.last_write = (0, 0)
        return keys, values

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
        self._buf_k, self._buf_v = gather_slots(keys, values, take[:, None])
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


    def retain(self, slots: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        raise ValueError("retain() acts on full layers; a bounded layer keeps sink + window")

    def nbytes(self) -> int:
        extra = 0 if self.sink_keys is None else self.sink_keys.numel() * self.sink_keys.element_size()
        return super().nbytes() + extra

    def get_max_length(self) -> int:
        return self.slots

    get_max_cache_shape = get_max_length  # its name before transformers 5.24

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a layer that has evicted tokens cannot be cropped")

    def _index_batch(self, fn) -> None:
        if self.sink_keys is not None and self.is_initialized:
            self.sink_keys = fn(self.sink_keys)
        super()._index_batch(fn)

    def __repr__(self) -> str:
        kind = "sliding" if self.is_sliding else "ring"
        return f"RingLayer({kind}, held={self.width}, seen={self.seen})"

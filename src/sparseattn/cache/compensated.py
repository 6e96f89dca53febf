"""A bounded layer that folds every token it drops into one compensation token (RazorAttention).

RazorAttention keeps sink + window for its non-retrieval heads and replaces what they drop with
one token whose key and value are the means of the dropped keys and values, so the dropped
context still takes a share of the softmax. The token sits in one slot after the sink and the
window; it is updated in place (a running mean) whenever the ring overwrites a token, so a
decode step adds a few element-wise operations and no host read.
"""

from __future__ import annotations

import torch

from ..types import EMPTY_POSITION
from .ring import RingLayer


class CompensatedLayer(RingLayer):
    """Sink + ring window + one compensation slot holding the mean of every dropped token.

    Choices: the mean is over the keys as cached (RoPE applied at their own positions) and the
    values, per (row, KV head), weighting every dropped token once; the slot's position is that
    of the latest dropped token, so it is visible to every later query and never counts as a sink
    or window token; a row that dropped nothing has the slot empty (masked by its position).
    """

    extra_slots = 1

    def __init__(self, *, window: int, sink: int = 0, page_size: int = 16) -> None:
        super().__init__(window=window, sink=sink, page_size=page_size)

    def _clear(self) -> None:
        super()._clear()
        self.comp_k = self.comp_v = None  # (B, Hkv, 1, D) running means
        self.comp_count: torch.Tensor | None = None  # (B, 1, 1, 1) tokens folded in
        self.comp_position: torch.Tensor | None = None  # (B,) latest dropped position
        self.bias: torch.Tensor | None = None  # (B, 1, capacity) log(count) at the slot, else 0

    @property
    def comp_slot(self) -> int:
        return self.sink + self.window

    def _fold(self, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor) -> None:
        """Fold sums of dropped keys/values (B, Hkv, 1, D) over ``counts`` (B, 1, 1, 1) tokens."""
        if self.comp_k is None:
            B, H, _, D = keys.shape
            self.comp_k = torch.zeros(B, H, 1, D, dtype=torch.float32, device=keys.device)
            self.comp_v = torch.zeros(
                B, H, 1, values.shape[-1], dtype=torch.float32, device=keys.device
            )
            self.comp_count = torch.zeros(B, 1, 1, 1, dtype=torch.float32, device=keys.device)
            self.comp_position = torch.full(
                (B,), EMPTY_POSITION, dtype=torch.long, device=keys.device
            )
        total = self.comp_count + counts
        weight = counts / total.clamp(min=1)  # share of the new tokens in the mean
        self.comp_k.add_((keys.float() / counts.clamp(min=1) - self.comp_k) * weight)
        self.comp_v.add_((values.float() / counts.clamp(min=1) - self.comp_v) * weight)
        self.comp_count = total

    def _store(self) -> None:
        """Write the running means into the compensation slot and publish it."""
        slot = self.comp_slot
        self._buf_k[:, :, slot : slot + 1] = self.comp_k.to(self._buf_k.dtype)
        self._buf_v[:, :, slot : slot + 1] = self.comp_v.to(self._buf_v.dtype)
        count = self.comp_count[:, 0, 0, 0]  # (B,)
        self.positions[:, 0, slot] = torch.where(count > 0, self.comp_position, EMPTY_POSITION)
        if self.bias is None or self.bias.shape[-1] != self.capacity:
            self.bias = torch.zeros(count.shape[0], 1, self.capacity, device=count.device)
        self.bias[:, 0, slot] = count.clamp(min=1).log()
        self.extra_held = 1

    def key_bias(self) -> torch.Tensor | None:
        """log(m) on the compensation slot, which stands for the m tokens it folded in: its
        share of the softmax is that of m keys equal to the mean key (RazorAttention)."""
        if not self.extra_held:
            return None
        held = self.width + self.extra_held
        if self._pending:  # a multi-token call over every held key and the new ones
            keys = self._call[0]
            bias = self.bias.new_zeros(keys.shape[0], 1, keys.shape[2])
            bias[:, :, :held] = self.bias[:, :, :held]
            return bias
        return self.bias[:, :, :held]

    def _compact(self) -> None:
        """The compensation token took part in the call's attention; it is not a token to keep
        or drop: the running mean goes on, folding in what this compaction drops."""
        if self.extra_held:
            self._call[2][:, :, self.comp_slot] = EMPTY_POSITION
        super()._compact()

    def _dropped(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, gone: torch.Tensor
    ) -> None:
        weight = gone[:, None, :, None].to(torch.float32)  # (B, 1, N, 1)
        self._fold(
            (keys.float() * weight).sum(2, keepdim=True),
            (values.float() * weight).sum(2, keepdim=True),
            weight.sum(2, keepdim=True),
        )
        latest = positions.masked_fill(~gone, -1).amax(-1)  # (B,) -1 where nothing was dropped
        self.comp_position = torch.where(latest >= 0, latest, self.comp_position)
        self._store()

    def _dropping(self, slot: int) -> None:
        position = self.positions[:, 0, slot]  # (B,) the token the ring overwrites
        gone = position != EMPTY_POSITION
        weight = gone[:, None, None, None].to(torch.float32)  # (B, 1, 1, 1)
        self._fold(
            self._buf_k[:, :, slot : slot + 1].float() * weight,
            self._buf_v[:, :, slot : slot + 1].float() * weight,
            weight,
        )
        self.comp_position = torch.where(gone, position, self.comp_position)
        self._store()

    def _index_batch(self, fn) -> None:
        for name in ("comp_k", "comp_v", "comp_count", "comp_position", "bias"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        super()._index_batch(fn)

    def nbytes(self) -> int:
        extra = [self.comp_k, self.comp_v, self.comp_count, self.comp_position, self.bias]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in extra if t is not None)

    def held_nbytes(self) -> int:
        return super().held_nbytes()  # the compensation token is one held slot

    def __repr__(self) -> str:
        return f"CompensatedLayer(held={self.width + self.extra_held}, seen={self.seen})"

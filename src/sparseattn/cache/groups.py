"""A cache layer whose KV heads are split into groups, each held by a layer of its own kind.

Per-head policies (DuoAttention, RazorAttention, LServe, MoA) keep some heads whole and bound
the others. One (B, Hkv, S, D) buffer would be as wide as the widest head, so nothing would be
freed in a layer with a single whole head; here each group of heads has its own buffers
(a full layer, a sink + window ring, a ring with a compensation token ...), so a bounded group
really holds only its window. Attention runs per group on its own keys (decode, later prompt
chunks); the first prompt chunk, whose keys are all new, runs once over every head with each
group's own prefill pattern (see ``integration/prefill.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import compat
from .layers import KVLayer
from .storage import state_nbytes


@dataclass
class HeadGroup:
    """KV heads of one layer held by one cache layer.

    Attributes:
        heads: KV head indices, ascending.
        layer: Their cache layer.
        prefill: Method for these heads' prompt tiles (None: the setting's prefill method).
        decode: Method for these heads' decode steps (None: the setting's decode method).
        kind: A label for reports ("full", "streaming", "window 512" ...).
    """

    heads: tuple[int, ...]
    layer: KVLayer
    prefill: Any = None
    decode: Any = None
    kind: str = ""


GroupMaker = Callable[[int, int], list[HeadGroup]]
"""(KV heads, prompt length) -> the groups: called once, at the layer's first update."""


class HeadGroupsLayer(CacheLayerMixin):
    """A cache layer made of head groups; transformers sees one layer.

    Args:
        groups: The groups, or a function of (KV heads, length of the first update) that makes
            them (policies whose spans or head split depend on the prompt length).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    sliding_window = None
    bounded = False
    window = None

    def __init__(self, groups: list[HeadGroup] | GroupMaker) -> None:
        super().__init__()
        self._maker = groups if callable(groups) else None
        self._fixed = None if callable(groups) else list(groups)
        self.origin: tuple = ("groups",)
        self._clear()

    def _clear(self) -> None:
        self.groups: list[HeadGroup] | None = self._fixed
        if self._fixed is not None:
            for group in self._fixed:
                group.layer.reset()
        self._index: list[torch.Tensor] = []
        self._q_index: list[torch.Tensor] = []
        self.is_initialized = False
        self.seen = 0
        self.writes = 0
        self.whole = False  # the latest call's keys are every key of every head (first prompt)
        self.keys = self.values = None
        self._call: tuple[torch.Tensor, torch.Tensor, None] | None = None
        self.shape: tuple[int, int] = (0, 0)  # (B, Hkv) of the latest call
        self.state: dict = {}

    # -- transformers' side ----------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        H = key_states.shape[1]
        if self.groups is None:
            self.groups = self._maker(H, key_states.shape[2])
        heads = sorted(h for g in self.groups for h in g.heads)
        if heads != list(range(H)):
            raise ValueError(
                f"head groups {[g.heads for g in self.groups]} must split the layer's {H} KV "
                "heads exactly once each"
            )
        device = key_states.device
        self._index = [torch.tensor(g.heads, device=device) for g in self.groups]
        for group in self.groups:
            group.layer.seen = self.seen
        self.is_initialized = True

    def query_heads(self, groups: int) -> list[torch.Tensor]:
        """Per group, the query-head indices of its KV heads (``groups`` query heads each)."""
        if len(self._q_index) != len(self._index):
            self._q_index = [
                (index[:, None] * groups + torch.arange(groups, device=index.device)).flatten()
                for index in self._index
            ]
        return self._q_index

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand each group its heads' new tokens; return the call's keys and values.

        Args:
            key_states: (B, Hkv, n, D) new keys; value_states likewise.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.whole = self.seen == 0
        for group, index in zip(self.groups, self._index):
            group.layer.update(
                key_states.index_select(1, index), value_states.index_select(1, index)
            )
        self.seen += key_states.shape[2]
        self.writes += 1
        self.keys, self.values = key_states, value_states  # this call only: see finish_call
        self._call = (key_states, value_states, None)
        self.shape = (key_states.shape[0], key_states.shape[1])
        return key_states, value_states

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # the mask covers every position; groups read theirs
        return self.seen + compat.query_length(query_length), 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.24

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a layer split into head groups cannot be cropped")

    def _each(self, name: str, *args) -> None:
        for group in self.groups or []:
            getattr(group.layer, name)(*args)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each("reorder_cache", beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each("batch_repeat_interleave", repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each("batch_select_indices", indices)

    def offload(self):
        return None

    def prefetch(self):
        return None

    # -- our hook's side -------------------------------------------------------------------
    def call_view(self) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        """The latest call's new keys and values (every head); groups hold what they keep."""
        return self._call

    def key_bias(self) -> None:
        return None  # a whole first prompt: no group has dropped anything yet

    @property
    def padded(self) -> bool:
        return any(g.layer.padded for g in self.groups or [])

    def mark_padding(self, key_valid: torch.Tensor) -> None:
        """Padding of a whole first prompt: each group's call covers the same keys."""
        self._each("mark_padding", key_valid)

    def finish_call(self) -> None:
        """After attention: each group compacts; the call's keys and values are released (the
        groups hold what they keep, so no reference to a whole prompt outlives its call)."""
        self._each("finish_call")
        self.keys = self.values = None
        self._call = None

    def nbytes(self) -> int:
        own = [t for t in (*self._index, *self._q_index)]
        groups = sum(g.layer.nbytes() for g in self.groups or [])
        return groups + sum(t.numel() * t.element_size() for t in own) + state_nbytes(self.state)

    def kv_nbytes(self) -> int:
        return sum(g.layer.kv_nbytes() for g in self.groups or [])

    def held_nbytes(self) -> int:
        return sum(g.layer.held_nbytes() for g in self.groups or [])

    def held_tokens(self) -> torch.Tensor | int:
        """(B, Hkv) tokens held per row and KV head (an int when every head holds the same)."""
        held = [g.layer.held_tokens() for g in self.groups or []]
        if not held:
            return 0
        if all(isinstance(h, int) for h in held) and len(set(held)) == 1:
            return held[0]
        out = torch.zeros(*self.shape, dtype=torch.long)
        for group, count in zip(self.groups, held):
            count = torch.as_tensor(count).cpu()
            out[:, list(group.heads)] = count.expand(out.shape[0], -1) if count.dim() else count
        return out

    def __repr__(self) -> str:
        kinds = ", ".join(f"{g.kind or 'group'} {list(g.heads)}" for g in self.groups or [])
        return f"HeadGroupsLayer({kinds}; seen={self.seen})"

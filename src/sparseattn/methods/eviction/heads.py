"""Head-level policies: each full-attention layer's KV heads split into groups of their own kind.

DuoAttention, LServe, RazorAttention and MoA decide per head, from an offline profile, how
much of the context that head keeps. Each builds a ``HeadGroupsLayer`` whose groups hold their
heads in buffers of their own (a full layer for whole heads, a sink + window ring for the
others), so a bounded head's memory is really freed even when its neighbours keep everything.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...cache.groups import HeadGroup, HeadGroupsLayer
from ...cache.layers import KVLayer
from ...errors import UsageError
from ...profiles.binding import bind_profile, open_profile
from ...profiles.profile import Profile
from ..base import knob
from .base import EvictionPolicy


def profile_knob(kind: str):
    """The ``profile`` knob of a policy that reads a ``kind`` profile."""
    return knob(
        "auto",
        help=f"'auto' (the shipped {kind} profile of the hooked model), a shipped profile name, "
        f"or a .json file written by `sparseattn profile --kind {kind}`",
    )


def full_attention_layers(config: Any) -> list[int]:
    """Indices of the layers that attend to the whole context (the model's sliding layers keep
    their own window and are never split)."""
    config = config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    n = config.num_hidden_layers
    return [i for i in range(n) if types is None or types[i] == "full_attention"]


def lowest(scores: dict[tuple[int, int], float], count: int) -> set[tuple[int, int]]:
    """The ``count`` (layer, head) keys with the lowest scores; ties go to the earlier key."""
    ranked = sorted(scores, key=lambda key: (scores[key], key))
    return set(ranked[: max(0, min(count, len(ranked)))])


def heads_for_compression(compression: float, total: int, kept: int, length: int) -> int:
    """Bounded heads needed so that ``compression`` of a ``length``-token prompt's KV is removed
    when each bounded head keeps ``kept`` tokens and the others keep all (of ``total`` heads);
    every head when even that falls short."""
    saved = 1 - min(kept, length) / length  # share one bounded head removes
    if saved <= 0:
        return 0
    return min(total, math.ceil(compression * total / saved - 1e-9))


def split_groups(
    num_kv_heads: int, whole: set[int], bounded: HeadGroup | None, full: HeadGroup
) -> list[HeadGroup]:
    """Groups of one layer: the heads in ``whole`` as ``full`` (its heads replaced), the rest as
    ``bounded``; an empty side is left out."""
    keep = tuple(h for h in range(num_kv_heads) if h in whole)
    rest = tuple(h for h in range(num_kv_heads) if h not in whole)
    groups = []
    if keep:
        full.heads = keep
        groups.append(full)
    if rest:
        bounded.heads = rest
        groups.append(bounded)
    return groups


@dataclass
class HeadSplitPolicy(EvictionPolicy):
    """Base of the head-level policies: a profile read once, a grouped layer per full layer.

    Subclasses set ``profile_kind`` and implement ``groups``; the profile knob (``profile``)
    names a file or a shipped profile, ``auto`` the shipped profile of the hooked model.
    """

    profile_kind = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._profile = open_profile(self.profile, self.profile_kind)
        self._bound: Profile | None = None
        self._config: Any = None

    def bind(self, config: Any) -> Profile:
        """The profile for ``config`` (resolved and checked once per model config)."""
        if self._bound is None or self._config is not config:
            profile = bind_profile(self._profile, self.profile, self.profile_kind, config)
            if profile is None:
                raise UsageError(
                    f"{self.name}: knob profile={self.profile!r}; a {self.profile_kind} profile "
                    f"is needed (a file, a shipped profile name, or 'auto')"
                )
            self._bound, self._config = profile, config
        return self._bound

    def make_layer(self, model: nn.Module, layer_idx: int, page_size: int) -> HeadGroupsLayer:
        profile = self.bind(model.config)
        config = model.config.get_text_config(decoder=True)
        profile.layer(profile.levels[0], layer_idx, self.profile_heads(config))  # covers it?
        return HeadGroupsLayer(
            lambda heads, length: self.groups(profile, config, layer_idx, heads, length, page_size)
        )

    def profile_heads(self, config: Any) -> int:
        """Heads per layer in the profile's tables (KV heads unless a subclass says otherwise)."""
        return config.num_key_value_heads

    @abstractmethod
    def groups(
        self,
        profile: Profile,
        config: Any,
        layer_idx: int,
        num_kv_heads: int,
        length: int,
        page_size: int,
    ) -> list[HeadGroup]:
        """The head groups of layer ``layer_idx`` for a first update of ``length`` tokens."""


def full_group(page_size: int, decode: Any = None) -> HeadGroup:
    """A group keeping every token of its heads."""
    return HeadGroup((), KVLayer(page_size=page_size), decode=decode, kind="full")

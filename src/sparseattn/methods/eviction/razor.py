"""RazorAttention: retrieval heads keep everything, the others sink + window + a compensation token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...cache.compensated import CompensatedLayer
from ...cache.groups import HeadGroup
from ...profiles.profile import Profile
from ...registry import register_policy
from ..base import knob
from ..static import Dense
from .heads import (
    HeadSplitPolicy,
    full_attention_layers,
    full_group,
    lowest,
    profile_knob,
    split_groups,
)

_BIG = 2**31 - 1


@register_policy
@dataclass
class RazorAttention(HeadSplitPolicy):
    """RazorAttention (Tang et al., ICLR 2025, arXiv:2407.15891): retrieval heads keep the whole
    cache; every other head keeps its first ``sink`` tokens, a recent buffer and one
    compensation token standing for everything it dropped.

    Heads are ranked by a retrieval profile (``sparseattn profile --kind retrieval``: the share
    of copied needle tokens a head's argmax attention lands on, Wu et al.); the ``retrieval``
    share of KV heads with the highest scores over every full-attention layer keep everything
    (the paper protects about 15% of heads). The others keep a recent buffer of
    max(``window``, ``ratio`` x N) tokens for an N-token prompt (the paper's max(S0, N / C)) plus
    ``sink`` tokens, and fold each token they drop, at the prefill and at every later step, into
    the compensation token: the mean of the dropped keys and values, whose logit carries log m
    for the m tokens it stands for, so it takes the softmax share of m copies of the mean key
    (the paper's compensated attention). With ``compression`` > 0 the buffer is instead set so
    that this share of the prompt's KV is removed (1 token when even that falls short).
    Choices: a KV head's score is the highest of its query heads' (its cache serves all of
    them); ties go to the earlier (layer, head); the model's sliding-window layers keep their
    own window; non-retrieval heads attend densely over what they hold (a decode method of the
    setting applies to the retrieval heads).
    """

    name: ClassVar[str] = "razor"
    paper: ClassVar[str] = (
        "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads (arXiv:2407.15891)"
    )
    profile_kind: ClassVar[str] = "retrieval"
    default_grid: ClassVar[dict] = {"compression": [0.5, 0.75, 0.9]}

    profile: str = profile_knob("retrieval")
    retrieval: float = knob(0.15, low=0.0, high=1.0, help="share of KV heads kept whole")
    sink: int = knob(4, low=0, high=_BIG, help="first tokens a non-retrieval head keeps")
    window: int = knob(
        512, low=1, high=_BIG, help="fewest recent tokens a non-retrieval head keeps"
    )
    ratio: float = knob(
        0.2, low=0.0, high=1.0, help="recent tokens kept as a share of the prompt (if > window)"
    )
    compression: float = knob(
        0.0, low=0.0, high=1.0, help="> 0: share of the prompt's KV to remove (sets the buffer)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._chosen: dict[tuple, frozenset] = {}

    def profile_heads(self, config: Any) -> int:
        return config.num_attention_heads  # retrieval scores are per query head

    def retrieval_heads(self, profile: Profile, config: Any) -> frozenset:
        """The (layer, KV head) pairs kept whole."""
        key = (id(profile), id(config))
        if key not in self._chosen:
            level, Hkv = profile.levels[0], config.num_key_value_heads
            g = config.num_attention_heads // Hkv
            scores = {
                (layer, h): -max(float(s) for s in profile.heads[level][layer][h * g : h * g + g])
                for layer in full_attention_layers(config)
                for h in range(Hkv)
            }  # negated: the lowest negated scores are the highest scores
            self._chosen[key] = frozenset(lowest(scores, round(self.retrieval * len(scores))))
        return self._chosen[key]

    def buffer(self, length: int, whole_share: float) -> int:
        """Recent tokens a non-retrieval head keeps of a ``length``-token prompt."""
        if self.compression <= 0:
            return max(self.window, round(self.ratio * length))
        if whole_share >= 1:
            return self.window
        kept = length * (1 - self.compression / (1 - whole_share))  # tokens a bounded head keeps
        return max(1, round(kept) - self.sink - 1)

    def groups(
        self,
        profile: Profile,
        config: Any,
        layer_idx: int,
        num_kv_heads: int,
        length: int,
        page_size: int,
    ) -> list[HeadGroup]:
        whole = self.retrieval_heads(profile, config)
        total = len(full_attention_layers(config)) * config.num_key_value_heads
        window = self.buffer(length, len(whole) / total)
        bounded = HeadGroup(
            (),
            CompensatedLayer(window=window, sink=self.sink, page_size=page_size),
            decode=Dense(),
            kind="compensated",
        )
        mine = {h for h in range(num_kv_heads) if (layer_idx, h) in whole}
        return split_groups(num_kv_heads, mine, bounded, full_group(page_size))

"""MoA: every KV head keeps its own sliding-window span, scaled with the prompt length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...cache.groups import HeadGroup
from ...cache.ring import RingLayer
from ...profiles.profile import Profile, span_at
from ...registry import register_policy
from ..base import knob
from ..static import Streaming
from .heads import HeadSplitPolicy, profile_knob


@register_policy
@dataclass
class MoA(HeadSplitPolicy):
    """MoA (Fu et al., arXiv:2406.14909): a mixture of sliding-window spans, one per head, each
    an elastic rule alpha + beta x N of the prompt length N, chosen offline under a density
    budget.

    A moa profile (``sparseattn profile --kind moa``) holds candidate rules and, per kept-KV
    budget, the rule of every (layer, KV head). ``compression`` picks the budget 1 -
    compression (the largest stored budget at or below it). Each head keeps its rule's sink first
    tokens and the last span(N) tokens in a ring; heads with equal spans share buffers, so a
    layer holds exactly the sum of its heads' spans. With ``prefill_spans`` the heads also
    prefill with their sink + span pattern (tiles rounded out), as MoA's sparse prefill.
    Choices: N is the first prefill's length, padding included, and spans stay fixed while
    generation slides each window forward; the model's sliding-window layers keep their own
    window.
    """

    name: ClassVar[str] = "moa"
    paper: ClassVar[str] = (
        "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression "
        "(arXiv:2406.14909)"
    )
    profile_kind: ClassVar[str] = "moa"
    default_grid: ClassVar[dict] = {"compression": [0.5, 0.75, 0.9]}

    profile: str = profile_knob("moa")
    compression: float = knob(
        0.5, low=0.0, high=1.0, help="share of the KV removed: selects the budget 1 - compression"
    )
    prefill_spans: bool = knob(
        True, choices=(False, True), help="heads also prefill with their sink + span"
    )

    def level(self, profile: Profile) -> float:
        """The stored budget this setting runs."""
        return profile.level_at_most(1 - self.compression)

    @property
    def changes_prefill(self) -> bool:
        return self.prefill_spans

    def groups(
        self,
        profile: Profile,
        config: Any,
        layer_idx: int,
        num_kv_heads: int,
        length: int,
        page_size: int,
    ) -> list[HeadGroup]:
        rules = profile.layer(self.level(profile), layer_idx, num_kv_heads)  # one per KV head
        spans: dict[tuple[int, int], list[int]] = {}
        for head, rule in enumerate(rules):
            sink = int(rule["sink"])
            spans.setdefault((sink, span_at(rule, length)), []).append(head)
        groups = []
        for (sink, window), heads in sorted(spans.items(), key=lambda item: item[1]):
            groups.append(
                HeadGroup(
                    tuple(heads),
                    RingLayer(window=window, sink=sink, page_size=page_size),
                    prefill=Streaming(sink=sink, window=window) if self.prefill_spans else None,
                    kind=f"span {window}",
                )
            )
        return groups

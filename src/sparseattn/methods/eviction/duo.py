"""DuoAttention and LServe: retrieval heads keep everything, streaming heads sink + window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...cache.groups import HeadGroup
from ...cache.ring import RingLayer
from ...profiles.profile import Profile
from ...registry import register_policy
from ..base import knob
from ..decode.quest import PAGE_SIZES, Quest
from ..static import Streaming
from .heads import (
    HeadSplitPolicy,
    full_attention_layers,
    full_group,
    heads_for_compression,
    lowest,
    profile_knob,
    split_groups,
)

_BIG = 2**31 - 1
FALLBACK_SINK, FALLBACK_WINDOW = 64, 256  # when a profile does not record its streaming sizes


@register_policy
@dataclass
class DuoAttention(HeadSplitPolicy):
    """DuoAttention (Xiao et al., ICLR 2025, arXiv:2410.10819): retrieval heads keep the whole
    context, streaming heads only the attention sink and a recent window.

    A duo profile (``sparseattn profile --kind duo``) holds one gate per (layer, KV head),
    optimised so that mixing full and streaming attention reproduces the full model. The
    ``sparsity`` share of the model's KV heads with the lowest gates become streaming heads
    (the paper's deployment picks the gate threshold from a target sparsity); with
    ``compression`` > 0 the count is instead the fewest streaming heads that remove that share
    of the prompt's KV at its length (all of them when even that falls short). Each streaming
    head keeps ``sink`` + ``window`` tokens in a ring of its own, so its memory is freed whatever
    its neighbours keep; retrieval heads keep a full cache. With ``prefill_streaming`` the
    streaming heads also prefill with the sink + window pattern (tiles rounded out, as the
    ``streaming`` method), which is where DuoAttention speeds up prefill. Choices: heads are
    ranked over every full-attention layer together (the model's sliding-window layers keep
    their own window and are not split); ties go to the earlier (layer, head); ``sink`` and
    ``window`` of 0 take the sizes the gates were trained with (recorded in the profile); the
    prompt length that sets the count under ``compression`` is the first prefill's, padding
    included.
    """

    name: ClassVar[str] = "duo"
    paper: ClassVar[str] = (
        "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads "
        "(arXiv:2410.10819)"
    )
    profile_kind: ClassVar[str] = "duo"
    default_grid: ClassVar[dict] = {"compression": [0.5, 0.75, 0.9]}

    profile: str = profile_knob("duo")
    sparsity: float = knob(0.5, low=0.0, high=1.0, help="share of KV heads made streaming heads")
    compression: float = knob(
        0.0,
        low=0.0,
        high=1.0,
        help="> 0: share of the prompt's KV to remove (sets the streaming heads' count)",
    )
    sink: int = knob(0, low=0, high=_BIG, help="sink tokens of a streaming head (0: the profile's)")
    window: int = knob(
        0, low=0, high=_BIG, help="recent tokens of a streaming head (0: the profile's)"
    )
    prefill_streaming: bool = knob(
        True, choices=(False, True), help="streaming heads also prefill with sink + window"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._chosen: dict[tuple, frozenset] = {}

    def sizes(self, profile: Profile) -> tuple[int, int]:
        """(sink, window) of a streaming head."""
        made = profile.calibration
        sink = self.sink or int(made.get("sink", FALLBACK_SINK))
        window = self.window or int(made.get("window", FALLBACK_WINDOW))
        return sink, window

    def streaming_heads(self, profile: Profile, config: Any, length: int) -> frozenset:
        """The (layer, KV head) pairs that stream, for a prompt of ``length`` tokens."""
        key = (id(profile), id(config), length if self.compression > 0 else 0)
        if key not in self._chosen:
            self._chosen[key] = self._rank(profile, config, length)
        return self._chosen[key]

    def _rank(self, profile: Profile, config: Any, length: int) -> frozenset:
        heads = config.num_key_value_heads
        level = profile.levels[0]
        gates = {
            (layer, h): float(profile.heads[level][layer][h])
            for layer in full_attention_layers(config)
            for h in range(heads)
        }
        if self.compression > 0:
            count = heads_for_compression(
                self.compression, len(gates), sum(self.sizes(profile)), length
            )
        else:
            count = round(self.sparsity * len(gates))
        return frozenset(lowest(gates, count))

    def full_decode(self) -> Any:
        """Decode method of the retrieval heads (None: the setting's)."""
        return None

    @property
    def changes_prefill(self) -> bool:
        return self.prefill_streaming

    def groups(
        self,
        profile: Profile,
        config: Any,
        layer_idx: int,
        num_kv_heads: int,
        length: int,
        page_size: int,
    ) -> list[HeadGroup]:
        streaming = self.streaming_heads(profile, config, length)
        sink, window = self.sizes(profile)
        bounded = HeadGroup(
            (),
            RingLayer(window=window, sink=sink, page_size=page_size),
            prefill=Streaming(sink=sink, window=window) if self.prefill_streaming else None,
            kind="streaming",
        )
        whole = {h for h in range(num_kv_heads) if (layer_idx, h) not in streaming}
        return split_groups(num_kv_heads, whole, bounded, full_group(page_size, self.full_decode()))


@register_policy
@dataclass
class LServe(DuoAttention):
    """LServe (Yang et al., MLSys 2025, arXiv:2502.14866): DuoAttention's streaming heads, and
    query-aware page selection (Quest) on the retrieval heads at decode.

    Streaming heads are chosen as in ``duo`` (half of the heads by default, as the paper);
    retrieval heads keep their whole cache and read, per generated token, the ``budget`` tokens
    of the pages whose key bounds promise the largest q.k (``quest``, pages of ``page`` tokens,
    bounds kept incrementally), so both the memory of the streaming heads and the reads of the
    retrieval heads shrink. Choices: one level of pages (the paper's hierarchical logical pages
    are not built; its page selector is Quest's bound); the setting's own decode method applies
    to the streaming heads (dense over their window unless set).
    """

    name: ClassVar[str] = "lserve"
    paper: ClassVar[str] = (
        "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention "
        "(arXiv:2502.14866)"
    )

    budget: int = knob(1024, low=1, high=_BIG, help="tokens a retrieval head reads per step")
    page: int = knob(16, choices=PAGE_SIZES, help="page size of the retrieval heads' selection")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._quest = Quest(block_size=self.page, budget=self.budget)

    def full_decode(self) -> Any:
        return self._quest

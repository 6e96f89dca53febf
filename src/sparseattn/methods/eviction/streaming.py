"""StreamingLLM eviction: keep the attention sink and a window of recent tokens, forget the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ...cache.ring import RingLayer
from ...cache.rope import rope_rotation
from ...registry import register_policy
from ..base import knob
from .base import EvictionPolicy

_BIG = 2**31 - 1


@register_policy
@dataclass
class StreamingEviction(EvictionPolicy):
    """Sink + window eviction (StreamingLLM, Xiao et al., ICLR 2024): bounded memory per layer.

    Each full-attention layer holds at most ``sink + window`` tokens (storage rounded up to a
    whole page): the first ``sink`` tokens of each sequence (padding excluded) and a ring of the
    ``window`` most recent ones; every new token overwrites the oldest window token in place,
    so memory and time per token stay flat however long generation runs. Choices: the prompt is
    prefilled with whatever prefill method is set and compacted after it; ``rerotate`` gives
    the paper's positions-inside-the-cache scheme (relative offsets as if the kept tokens were
    consecutive), which lets a model generate past its trained context; without it tokens keep
    their original positions.
    """

    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = (
        "Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    )
    default_grid: ClassVar[dict] = {"window": [256, 512, 1024]}

    sink: int = knob(128, low=0, high=_BIG, help="first tokens every layer keeps (attention sink)")
    window: int = knob(1024, low=1, high=_BIG, help="most recent tokens every layer keeps")
    rerotate: bool = knob(
        False, choices=(False, True), help="re-apply RoPE so kept tokens sit inside the cache"
    )

    def make_layer(self, model: nn.Module, layer_idx: int, page_size: int) -> RingLayer:
        rotation = None
        if self.rerotate:
            types = getattr(model.config.get_text_config(decoder=True), "layer_types", None)
            rotation = rope_rotation(model, types[layer_idx] if types else None)
        return RingLayer(window=self.window, sink=self.sink, page_size=page_size, rotation=rotation)

"""DELTA: a selection layer every few layers chooses the tokens the layers after it read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...registry import register_method
from ..base import knob
from .crosslayer import CrossLayer

_BIG = 2**31 - 1


@register_method
@dataclass
class Delta(CrossLayer):
    """DELTA (Entezari Zarch et al., 2025, arXiv:2510.09883): Δ-layers choose, later layers read.

    Layers below ``full_layers`` attend densely; from there a selection layer (a Δ-layer) every
    ``select_every`` layers attends densely and chooses the ``budget`` tokens with the most
    attention mass over all its heads; the layers after it read only those tokens, the full KV
    cache being kept (see ``crosslayer``). Choices: the paper's unified head selection is the
    mass summed over every query head's exact softmax, one choice per batch row; its stable
    recency window is ``window`` (the reference keeps the last 8 pages; 128 tokens here by
    default) and the sink and current token are read as well, all counted in the budget; tokens
    are chosen one by one rather than by page; ``select_every=12`` puts the Δ-layers of a
    28-layer model at 2, 14 and 26 (the reference run of DeepSeek-R1-Distill-Qwen-7B uses full
    layers 0-1 and Δ-layers 2, 14 and 22).
    """

    name: ClassVar[str] = "delta"
    paper: ClassVar[str] = (
        "DELTA: Dynamic Layer-Aware Token Attention for Efficient Long-Context Reasoning "
        "(arXiv:2510.09883)"
    )

    window: int = knob(128, low=0, high=_BIG, help="most recent tokens always read")
    select_every: int = knob(12, low=1, high=_BIG, help="layers from one Δ-layer to the next")

    def selects(self, layer_idx: int) -> bool:
        return (layer_idx - self.full_layers) % self.select_every == 0

"""PyramidKV eviction: SnapKV's scores, a prompt budget that shrinks linearly with depth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...cache.layers import KVLayer
from ...registry import register_policy
from ..base import knob
from .snapkv import SnapKV


class DepthLayer(KVLayer):
    """A full cache layer that knows its rank among the layers a policy compresses.

    Args:
        rank: 0 for the first full-attention layer, ``count - 1`` for the last.
        count: Full-attention layers in the model.
    """

    def __init__(self, rank: int, count: int, *, page_size: int = 16) -> None:
        super().__init__(page_size=page_size)
        self.rank, self.count = rank, count


def full_attention_layers(model: nn.Module) -> list[int]:
    """Indices of the layers transformers caches in full (the ones a policy compresses)."""
    config = model.config.get_text_config(decoder=True)
    layers = DynamicCache(config=config).layers
    return [i for i, layer in enumerate(layers) if type(layer) is DynamicLayer]


def pyramid_capacity(mean: int, prefix: int, rank: int, count: int, beta: float) -> int:
    """Prefix keys kept by layer ``rank`` of ``count`` when the layers keep ``mean`` on average.

    c_max = min(prefix, (2 - 1/beta) mean), c_min = 2 mean - c_max, and layer j keeps
    c_j = c_max - (c_max - c_min) j / (count - 1); integers come from rounding the running sum
    S_j = sum_{i<j} c_i, so cap_j = round(S_{j+1}) - round(S_j) and the layers keep exactly
    ``count * mean`` together (exact rational arithmetic).
    """
    if count == 1:
        return mean
    high = min(Fraction(prefix), (2 - 1 / Fraction(beta)) * mean)  # exact: no rounding ties
    step = 2 * (high - mean) / (count - 1)  # c_max - c_min over count - 1 steps

    def running(j: int) -> int:  # round(S_j), halves up
        return math.floor(j * high - step * j * (j - 1) / 2 + Fraction(1, 2))

    return running(rank + 1) - running(rank)


@register_policy
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., arXiv:2406.02069): SnapKV scoring with more prompt keys kept in
    the first layers and fewer in the last, the same total as SnapKV.

    Let c be SnapKV's prefix capacity of a row (keys kept per head besides the observation
    window, from ``compression`` or ``capacity``), P its prefix length and m the model's
    full-attention layers. Layer j (0 = first) keeps
    c_j = c_max - (c_max - c_min) j / (m - 1) prefix keys per head, with
    c_max = min(P, (2 - 1/beta) c) and c_min = 2 c - c_max (c_min = c / beta unless capped
    by P), so the mean over layers is c; integer budgets round the running sum, keeping
    exactly m c prefix keys per head over the layers. Every layer keeps its observation
    window. Choices: depth counts full-attention layers only (sliding-window layers keep their
    window); ``beta`` = 20 as the authors' code.
    """

    name: ClassVar[str] = "pyramidkv"
    paper: ClassVar[str] = (
        "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling "
        "(arXiv:2406.02069)"
    )

    beta: float = knob(20.0, low=1.0, high=1e6, help="last layer keeps mean / beta (1: flat)")

    def make_layer(self, model: nn.Module, layer_idx: int, page_size: int) -> KVLayer:
        full = full_attention_layers(model)
        return DepthLayer(full.index(layer_idx), len(full), page_size=page_size)

    def capacities(self, layer: KVLayer, tokens: list[int], prefix: list[int]) -> list[int]:
        if not isinstance(layer, DepthLayer):
            raise TypeError("pyramidkv compresses the layers it built (DepthLayer)")
        return [
            pyramid_capacity(self.prefix_capacity(n, p), p, layer.rank, layer.count, self.beta)
            for n, p in zip(tokens, prefix)
        ]

"""Eviction policies: what a cache layer keeps. They act on the cache, not on the call."""

from __future__ import annotations

import dataclasses
from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...cache.layers import KVLayer
from ...types import AttentionContext
from ..base import validate_knobs


@dataclass
class EvictionPolicy(ABC):
    """Decides which KV entries a full-attention cache layer keeps; memory is really freed.

    Subclasses are dataclasses whose fields are knobs, registered with ``@register_policy``.
    A policy builds the cache layer of every full-attention layer (``make_layer``) and, when it
    scores the prompt with its queries (SnapKV-style), compacts the layer after the prefill
    (``after_prefill``). The model's own sliding-window layers keep their window and are never
    touched by a policy.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False  # scores the prompt with its queries after prefill
    default_grid: ClassVar[dict[str, list[Any]]] = {}

    def __post_init__(self) -> None:
        validate_knobs(self)

    @property
    def changes_prefill(self) -> bool:
        """True when the policy also changes how the prompt is attended (not only what is
        kept after it), so a dense prefill cannot stand in for its own."""
        return False

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def make_layer(self, model: nn.Module, layer_idx: int, page_size: int) -> KVLayer:
        """The cache layer of full-attention layer ``layer_idx`` (a full layer by default)."""
        return KVLayer(page_size=page_size)

    def after_prefill(self, layer: KVLayer, query: torch.Tensor, ctx: AttentionContext) -> None:
        """Compact ``layer`` once the prompt has been attended (policies that need queries).

        Args:
            layer: The layer's cache, holding the whole prompt of this call.
            query: (B, Hq, Lq, D) the prompt's queries.
            ctx: The call's context (positions, padding).
        """

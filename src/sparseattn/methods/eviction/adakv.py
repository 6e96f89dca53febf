"""AdaKV eviction: SnapKV's scores, one budget per layer shared by its KV heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register_policy
from ..base import knob
from .snapkv import SnapKV, best_first, top_per_head


def shared_budget(scores: torch.Tensor, capacities: list[int], floor: float) -> torch.Tensor:
    """(B, H, Lp) scores -> (B, H, Lp) bool: row b keeps H * capacities[b] slots over its heads.

    Each head first gets its ``int(floor * capacities[b])`` best slots; the rest of the budget
    goes to the highest scores over all heads of the row jointly.
    """
    B, H, prefix = scores.shape
    floors = [int(floor * c) for c in capacities]
    guaranteed = top_per_head(scores, floors)  # (B, H, Lp)
    joint = scores.masked_fill(guaranteed, float("inf")).reshape(B, H * prefix)
    budgets = [H * c for c in capacities]
    most = max(budgets)
    top = best_first(joint)[:, :most]  # (B, most)
    limit = torch.tensor(budgets, device=scores.device)[:, None]  # (B, 1)
    within = torch.arange(most, device=scores.device) < limit  # (B, most)
    keep = torch.zeros_like(joint, dtype=torch.bool).scatter_(-1, top, within)
    return keep.view(B, H, prefix)


@register_policy
@dataclass
class AdaKV(SnapKV):
    """AdaKV (Feng et al., arXiv:2407.11550): SnapKV scoring with the layer's prompt budget
    shared by its KV heads, so heads with spread attention keep more keys than focused ones.

    A row's layer budget is Hkv x c prefix keys (c: SnapKV's per-head prefix capacity, from
    ``compression`` or ``capacity``); every head first keeps its int(floor x c) best keys (the
    paper's safeguard), the rest of the budget goes to the highest scores over all heads of
    the layer jointly. Every head also keeps the observation window. Heads end up holding
    different counts summing to Hkv x (c + window): the cache stores no placeholder keys but
    each layer's storage is as wide as its widest head (narrower heads have empty slots), so
    memory is that of the widest head. Choices: scores are comparable across heads because each
    is a mean of softmax probabilities; the floor defaults to 0.2 as in the authors' code.
    """

    name: ClassVar[str] = "adakv"
    paper: ClassVar[str] = (
        "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM "
        "Inference (arXiv:2407.11550)"
    )

    floor: float = knob(0.2, low=0.0, high=1.0, help="share of the uniform budget every head keeps")

    def choose(self, scores: torch.Tensor, capacities: list[int]) -> torch.Tensor:
        return shared_budget(scores, capacities, self.floor)

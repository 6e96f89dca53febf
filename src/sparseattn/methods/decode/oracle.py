"""The decode oracle: the true top-k tokens of every head from exact scores (analysis only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register_method
from ...types import AttentionContext, DecodeView, Phase, TokenSelection
from ..base import Method, knob
from .tokens import kv_head_scores, top_tokens

_BIG = 2**31 - 1


@register_method
@dataclass
class DecodeOracle(Method):
    """Exact top-k: every query head reads the ``budget`` held tokens with its highest exact
    q.k (softcap applied), nothing forced. The upper bound of recall at a budget that every
    decode estimator is compared with; it scores every key, so it is no speedup.
    """

    name: ClassVar[str] = "decode_oracle"
    paper: ClassVar[str] = "The upper bound of the decode selection methods (analysis)"
    phases: ClassVar = frozenset({Phase.DECODE})
    is_speedup: ClassVar[bool] = False
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [256, 512, 1024]}

    budget: int = knob(1024, low=1, high=_BIG, help="tokens read per step per query head")

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> TokenSelection | None:
        if self.budget >= ctx.kv_len and self.dense_when_covered:
            return None  # the budget covers the cache: dense
        scores = kv_head_scores(q, view.keys, ctx) * ctx.scaling  # (B, Hkv, g, Lk)
        if ctx.softcap is not None:
            scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
        scores = scores.flatten(1, 2)  # (B, Hq, Lk)
        nothing = torch.zeros(1, 1, 1, dtype=torch.bool, device=scores.device)
        return top_tokens(scores, nothing, self.budget, ctx)

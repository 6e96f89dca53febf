"""MInference 1.0: vertical-slash, pooled block top-k, and per-head patterns from a profile."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..backends.masks import BlockLayout
from ..errors import UsageError
from ..profiles import bind_profile, open_profile
from ..registry import build_method, register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .estimators import (
    FORCED_COLUMNS,
    FORCED_DIAGONALS,
    diagonal_mass,
    grouped_scores,
    last_query_probs,
    lines_to_tiles,
    pool_blocks,
    top_lines,
)

_BIG = 2**31 - 1


@register_method
@dataclass
class VerticalSlash(Method):
    """MInference's vertical-slash pattern (Jiang et al., NeurIPS 2024, arXiv:2407.02490).

    The last ``last_queries`` queries attend densely to every key; their summed attention per
    key ranks vertical columns and per diagonal offset ranks slash lines; the top
    ``vertical_size`` columns and ``slash_size`` diagonals are kept for every query, executed as
    the tiles they cross. Choices: the first 4 columns and the 64 main diagonals are always kept;
    columns and diagonals are chosen per (batch row, query head), the forced ones on top of the
    budget; the estimate uses the exact
    attention of the last queries in float32.
    """

    name: ClassVar[str] = "vertical_slash"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs (arXiv:2407.02490)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"vertical_size": _BIG}
    default_grid: ClassVar[dict] = {"vertical_size": [128, 512], "slash_size": [128, 512]}

    last_queries: int = knob(
        64, low=1, high=4096, help="final queries whose attention ranks columns and diagonals"
    )
    vertical_size: int = knob(256, low=1, high=_BIG, help="key columns kept")
    slash_size: int = knob(256, low=1, high=_BIG, help="diagonals kept")

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        probs = last_query_probs(q, k, ctx, self.last_queries)  # (B, Hq, n, Lk)
        columns = top_lines(probs.sum(2), self.vertical_size, FORCED_COLUMNS)
        offsets = top_lines(diagonal_mass(probs, ctx), self.slash_size, FORCED_DIAGONALS)
        return layout.finalize(lines_to_tiles(columns, offsets, ctx, layout))

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        forced = 1 + -(-(FORCED_DIAGONALS + layout.block_size - 1) // layout.block_size) + 1
        return min(layout.n_kv_blocks, self.vertical_size + 2 * self.slash_size + forced)


@register_method
@dataclass
class BlockSparse(Method):
    """MInference's block-sparse pattern: mean-pooled Q and K tiles, top-k key tiles per query tile.

    Choices: pooled scores are scaled like attention logits and soft-maxed over the visible key
    tiles of each row before ranking (ranking is the same without the softmax); a ragged last tile
    is averaged over its real tokens; padded keys are excluded only through the visibility mask,
    not from the means.
    """

    name: ClassVar[str] = "block_sparse"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs (arXiv:2407.02490)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"top_k": 1 << 20}
    default_grid: ClassVar[dict] = {"top_k": [4, 8, 16]}

    top_k: int = knob(
        8, low=1, high=1 << 20, help="key tiles kept per query tile (plus the diagonal)"
    )

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        qp = pool_blocks(q, ctx.q_len, layout.block_size)  # (B, Hq, nQ, D)
        kp = pool_blocks(k, ctx.kv_len, layout.block_size)  # (B, Hkv, nK, D)
        scores = grouped_scores(qp, kp) * ctx.scaling  # (B, Hq, nQ, nK)
        scores = scores.masked_fill(~layout.visible[:, None], float("-inf"))
        top = scores.softmax(-1).topk(min(self.top_k, layout.n_kv_blocks), dim=-1).indices
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return layout.finalize(mask)

    def max_tiles_per_row(self, layout: BlockLayout) -> int:
        return self.top_k + 1


def _gqa_calls(heads: list[int], groups: int) -> list[tuple[list[int], list[int]]]:
    """Split query heads that run one pattern into calls shaped like grouped-query attention.

    A call takes the KV heads that give it the same number of its query heads, so each KV
    head's keys serve its query heads as they are, never copied once per query head.

    Args:
        heads: Ascending query head indices.
        groups: Query heads per KV head in the model.

    Returns:
        (query heads ordered by KV head, their ascending KV heads) per call.
    """
    by_kv: dict[int, list[int]] = {}
    for head in heads:
        by_kv.setdefault(head // groups, []).append(head)
    by_count: dict[int, list[int]] = {}  # KV heads by how many of their query heads are here
    for kv, q_heads in by_kv.items():
        by_count.setdefault(len(q_heads), []).append(kv)
    return [([h for kv in kvs for h in by_kv[kv]], kvs) for kvs in by_count.values()]


PROFILE_PATTERNS = ("streaming", "vertical_slash", "block_sparse")  # A-shape, VS, block-sparse


@register_method
@dataclass
class MInference(Method):
    """MInference 1.0 with per-head patterns (Jiang et al., NeurIPS 2024, arXiv:2407.02490).

    Each head runs the pattern its profile assigns: A-shape (``streaming``), ``vertical_slash``
    or ``block_sparse``, with the pattern's own knobs; the online estimates (last-query lines,
    pooled tiles) are computed per input for the heads that need them. Profiles come from
    ``sparseattn profile --kind minference``, which searches, per head, the pattern and size
    that recall the most true attention mass within a tile-density budget, for several budgets.
    Choices where the paper is open: the search measures recall and density at tile granularity
    (what the flex backend executes) instead of FLOPs of the token-level kernels; the budget
    knob picks the largest stored budget at or below it; pattern sizes are in tokens (tiles for
    block_sparse) as calibrated, so density falls at lengths beyond the calibration length;
    layers with their own sliding window (Gemma 3, Mistral) keep that window unchanged.
    """

    name: ClassVar[str] = "minference"
    paper: ClassVar[str] = (
        "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs (arXiv:2407.02490)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"budget": 1.0}
    default_grid: ClassVar[dict] = {"budget": [0.1, 0.2, 0.3]}

    budget: float = knob(
        0.2, low=0.01, high=1.0, help="tile-density budget of the profile's head search (1 = dense)"
    )
    profile: str = knob(
        "auto",
        help="'auto' (the shipped profile of the hooked model), a shipped profile name, "
        "or a .json file written by `sparseattn profile --kind minference`",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._patterns: dict[tuple, Method] = {}
        self._profile = open_profile(self.profile, "minference", block_size=self.block_size)
        if self._profile is not None:
            for choice in self._profile.choices:
                if choice.get("pattern") not in PROFILE_PATTERNS:
                    raise UsageError(
                        f"profile {self._profile.source}: pattern {choice.get('pattern')!r} "
                        f"is not one of {list(PROFILE_PATTERNS)}"
                    )

    def bind(self, config: Any) -> None:
        self._profile = bind_profile(
            self._profile, self.profile, "minference", config, block_size=self.block_size
        )

    def _pattern(self, entry: dict[str, Any]) -> Method:
        key = (entry["pattern"], tuple(sorted(entry.get("knobs", {}).items())))
        if key not in self._patterns:
            knobs = {**entry.get("knobs", {}), "block_size": self.block_size}
            self._patterns[key] = build_method(entry["pattern"], **knobs)
        return self._patterns[key]

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        if self.budget >= 1.0 or ctx.sliding_window is not None:
            return layout.every_tile(ctx.num_q_heads)  # a sliding layer is already local
        if self._profile is None:
            raise UsageError(
                f"minference with profile={self.profile!r} has no profile: use 'auto' through "
                "sparse_attention(model, ...) (which needs the model), or pass profile=FILE.json"
            )
        level = self._profile.level_at_most(self.budget)
        entries = self._profile.layer(level, ctx.layer_idx, ctx.num_q_heads)
        groups: dict[int, list[int]] = {}
        for head, entry in enumerate(entries):
            groups.setdefault(id(self._pattern(entry)), []).append(head)
        mask = torch.zeros(
            ctx.batch, ctx.num_q_heads, layout.n_q_blocks, layout.n_kv_blocks,
            dtype=torch.bool, device=ctx.device,
        )  # fmt: skip
        for heads in groups.values():
            method = self._pattern(entries[heads[0]])
            for q_heads, kv_heads in _gqa_calls(heads, ctx.groups):
                q_index = torch.tensor(q_heads, device=q.device)
                sub_k = k  # (B, Hkv, Lk, D), or the KV heads of this call
                if len(kv_heads) < ctx.num_kv_heads:
                    sub_k = k.index_select(1, torch.tensor(kv_heads, device=k.device))
                sub_ctx = dataclasses.replace(
                    ctx, num_q_heads=len(q_heads), num_kv_heads=len(kv_heads)
                )
                chosen = method.select(q.index_select(1, q_index), sub_k, sub_ctx, layout)
                mask[:, q_index] = chosen.mask
        return layout.finalize(mask)

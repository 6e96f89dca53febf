"""TokenSelect: per-KV-head soft voting over exact q.k, top-k tokens, a selection cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register_method
from ...types import AttentionContext, DecodeView, Phase, TokenSelection
from ..base import Method, knob
from .tokens import check_budget, forced_tokens, group_vote, kv_head_scores, top_tokens

_BIG = 2**31 - 1


@dataclass
class _Reuse:
    """A layer's last selections, per batch row, for the next steps while queries stay similar.

    Attributes:
        query: (B, Hq, D) the query that made each row's selection.
        indices: (B, Hkv, K) slots chosen then, plus the tokens appended since; K = budget +
            max_reuse, fixed: reuse r of a row writes its current token into column budget + r.
        valid: (B, Hkv, K) False for the columns no token has filled yet.
        reused: (B,) consecutive steps each row's selection has been reused.
        kv_len: Held keys the slots refer to.
        writes: The layer's update count the state includes.
    """

    query: torch.Tensor
    indices: torch.Tensor
    valid: torch.Tensor
    reused: torch.Tensor
    kv_len: int
    writes: int


@register_method
@dataclass
class TokenSelect(Method):
    """TokenSelect (Wu et al., 2024, arXiv:2411.02886): each KV head reads the ``budget`` tokens
    its query heads vote for.

    Every query head scores every held key exactly (q.k, one matmul per KV head for its group,
    no K copy); each head's scores become a softmax and the group sums them (a soft vote, so a
    head with large logits does not decide alone); the top ``budget`` tokens, the sink, the
    last ``window`` tokens and the current token are read. The selection cache: when every batch
    row's query is close to the query that made the layer's last selection (mean cosine over
    query heads >= ``reuse_threshold``), the step reuses that selection plus the tokens appended
    since, without scoring, for at most ``max_reuse`` steps (compared with the query that
    made the selection rather than the previous one, so drift cannot accumulate). With the
    cache on, every selection has the static width ``budget + max_reuse`` (a fresh choice
    leaves the last ``max_reuse`` columns empty; each reuse fills the next one with the token
    it appends), whatever the batch rows' reuse phases. Deciding to reuse reads one value on
    the host per layer and step (a device sync on GPU: skipping the scoring is what the cache
    saves, and only the host can skip it), so the cache is off by default (``max_reuse=0``)
    and the default decode step reads nothing on the host; ``max_reuse=8`` turns it on (a
    ``reuse_threshold`` above 1 turns it off as well). Hits and lookups are the counters
    ``tokenselect_hits`` / ``tokenselect_lookups`` of ``last_stats`` (batch rows counted).
    """

    name: ClassVar[str] = "tokenselect"
    paper: ClassVar[str] = (
        "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via "
        "Dynamic Token-Level KV Cache Selection (arXiv:2411.02886)"
    )
    phases: ClassVar = frozenset({Phase.DECODE})
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [256, 512, 1024]}

    budget: int = knob(1024, low=1, high=_BIG, help="tokens read per step per KV head")
    sink: int = knob(0, low=0, high=_BIG, help="first tokens always read")
    window: int = knob(0, low=0, high=_BIG, help="most recent tokens always read")
    reuse_threshold: float = knob(
        0.9, low=-1.0, high=2.0, help="cosine to the last selecting query to reuse (> 1: off)"
    )
    max_reuse: int = knob(
        0, low=0, high=_BIG, help="consecutive steps a selection is reused (0: no cache)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.name, self.budget, self.sink, self.window)

    @property
    def caches_selection(self) -> bool:
        return self.reuse_threshold <= 1.0 and self.max_reuse > 0

    @property
    def width(self) -> int:
        """Columns of every selection: the budget, plus ``max_reuse`` for the tokens a reused
        selection appends when the cache is on."""
        return self.budget + (self.max_reuse if self.caches_selection else 0)

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> TokenSelection | None:
        if self.budget >= ctx.kv_len and self.dense_when_covered:
            return None
        query = q[:, :, 0].float()  # (B, Hq, D)
        cached = self._cached(query, view, ctx)
        if cached is None:
            selection = self._fresh(q, view, ctx)
            if self.caches_selection:
                reused = torch.zeros(ctx.batch, dtype=torch.long, device=q.device)
                view.state[self.name] = _Reuse(
                    query, selection.indices, selection.valid, reused, ctx.kv_len, view.writes
                )
            return selection
        # each row reuses its selection while its query stays close to the one that made it
        cosine = torch.nn.functional.cosine_similarity(query, cached.query, dim=-1).mean(-1)
        hit = (cosine >= self.reuse_threshold) & (cached.reused < self.max_reuse)  # (B,)
        hits = int(hit.sum())  # the one host read: is any scoring needed, is anything reused
        view.count("tokenselect_lookups", float(ctx.batch))
        view.count("tokenselect_hits", float(hits))
        # a hitting row appends the current token in column budget + reused (< width)
        column = (self.budget + cached.reused).clamp(max=self.width - 1)  # (B,)
        column = column[:, None, None].expand(*cached.indices.shape[:2], 1)  # (B, Hkv, 1)
        indices = cached.indices.scatter(-1, column, ctx.kv_len - 1)  # (B, Hkv, width)
        valid = cached.valid.scatter(-1, column, True)
        if hits < ctx.batch:  # some rows choose afresh
            fresh = self._fresh(q, view, ctx)
            if hits == 0:
                indices, valid = fresh.indices, fresh.valid
            else:
                row = hit[:, None, None]
                indices = torch.where(row, indices, fresh.indices)
                valid = torch.where(row, valid, fresh.valid)
            query = torch.where(hit[:, None, None], cached.query, query)
        else:
            query = cached.query
        reused = torch.where(hit, cached.reused + 1, 0)
        view.state[self.name] = _Reuse(query, indices, valid, reused, ctx.kv_len, view.writes)
        return TokenSelection(indices=indices, valid=valid)

    def _fresh(self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext) -> TokenSelection:
        """A new choice, (B, Hkv, width): the budget's tokens, then ``max_reuse`` empty columns
        when the cache is on (filled by later reuses)."""
        scores = group_vote(kv_head_scores(q, view.keys, ctx), ctx)  # (B, Hkv, Lk)
        chosen = top_tokens(scores, forced_tokens(ctx, self.sink, self.window), self.budget, ctx)
        if not self.caches_selection:
            return chosen
        pad = self.width - chosen.indices.shape[-1]
        return TokenSelection(
            indices=torch.nn.functional.pad(chosen.indices, (0, pad)),
            valid=torch.nn.functional.pad(chosen.valid, (0, pad), value=False),
        )

    def _cached(self, query: torch.Tensor, view: DecodeView, ctx: AttentionContext):
        """The layer's selection state if it may be reused at this step, else None.

        Only over a layer that appended exactly one token since: a ring or an evicting cache
        overwrites or moves slots, so its old slots would name other tokens.
        """
        if not self.caches_selection:
            return None
        cached: _Reuse | None = view.state.get(self.name)
        appended = (
            cached is not None
            and cached.writes == view.writes - 1
            and ctx.kv_len == cached.kv_len + 1
            and tuple(view.last_write) == (cached.kv_len, ctx.kv_len)
            and cached.query.shape == query.shape
        )
        return cached if appended else None

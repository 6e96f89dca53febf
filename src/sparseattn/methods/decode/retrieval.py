"""RetrievalAttention: per-head ANN indexes over the cached keys answer each decode query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ...backends.masks import heads_to_query_heads, key_positions
from ...backends.sdpa import decode_key_mask
from ...errors import UsageError
from ...registry import register_method
from ...types import EMPTY_POSITION, AttentionContext, DecodeView, Phase, TokenSelection
from ..base import Method, knob
from .tokens import check_budget, forced_tokens

_BIG = 2**31 - 1
INDEXES = ("hnsw", "flat")


def import_faiss() -> Any:
    """The faiss module, or a UsageError saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise UsageError(
            "retrieval_attention needs faiss, which is not installed: pip install faiss-cpu"
        ) from error
    return faiss


def per_row(mask: torch.Tensor, rows: int, ctx: AttentionContext) -> torch.Tensor:
    """(B or 1, 1 or Hkv, Lk) -> (B or 1, 1 or rows, Lk): KV-head masks for query-head rows."""
    return mask if rows == ctx.num_kv_heads else heads_to_query_heads(mask, ctx)


@dataclass
class KeyIndexes:
    """One ANN index per (batch row, KV head) over one cache layer's keys.

    Attributes:
        indexes: B * Hkv faiss indexes, row-major over (b, h); their ids are cache slots.
        size: Slots the indexes cover (the layer's held length when last updated).
        writes: The layer's update count the indexes include.
        stale: Entries per index superseded by a later vector under the same slot id (a graph
            index cannot remove a slot a ring overwrote); 0 for flat indexes.
    """

    indexes: list
    size: int
    writes: int
    stale: int = 0


@register_method
@dataclass
class RetrievalAttention(Method):
    """RetrievalAttention (Liu et al., 2024, arXiv:2409.10516): each decode query reads the keys
    an approximate-nearest-neighbour search over the cached keys returns, plus static tokens.

    Per (batch row, KV head) a faiss inner-product index holds that head's cached keys:
    ``index="hnsw"`` (an HNSW graph, ``hnsw_m`` links per node, ``ef_search`` candidates,
    raised to the budget when smaller) or ``index="flat"`` (exact search, for tests and
    recall baselines). A decode step searches the top ``budget`` keys and reads them together
    with the first ``sink`` tokens, the last ``window`` tokens and the current token, at most
    ``budget`` tokens in all (forced tokens first, then the best retrieved ones).

    Choices the paper left open: the index is built on the first decode step after the
    prefill from the cache's keys (padding and empty slots left out) and kept as the layer's
    state; each later step only adds the slots the step wrote (``view.last_write``). A ring
    (a bounded cache) overwrites held slots in place (and a re-rotating one its sinks,
    ``view.rewritten``): a flat index removes those slots' vectors and adds the new ones under
    the same ids; a graph index cannot remove entries, so the new vectors are added beside
    the superseded ones (a search may return a superseded entry, whose slot is then read with
    its current key) and the index is rebuilt only once superseded entries outnumber the held
    slots, so a ring costs an amortised constant, not a rebuild per step. It is rebuilt when
    an update was missed or slots moved (a compaction). The paper builds its graph from
    prefill queries to bridge the query/key distribution gap; here the graph is built over the
    keys alone with the inner-product metric. With GQA, by default the group's mean query
    searches its KV head's index (mean q.k ranks keys by the group's mean logit): one search
    and one gather per KV head, selection rows of Hkv. ``per_query_head=True`` searches with
    every query head, as in the paper, and returns Hq rows (each head its own ``budget``
    tokens, gathered per query head). ``report_recall=True`` also scores every indexed key
    exactly and counts ``retrieval_recall_hits`` / ``retrieval_recall_total`` (the retrieved
    share of the true top ``budget`` per search row) for ``last_stats(model).counter(...)``.

    faiss runs on the host: on a GPU each step copies the queries and the new keys to the
    host and the results back (a device sync per layer and step); on CPU tensors faiss reads
    views of them and no tensor value is read by Python.
    """

    name: ClassVar[str] = "retrieval_attention"
    paper: ClassVar[str] = (
        "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval "
        "(arXiv:2409.10516)"
    )
    phases: ClassVar = frozenset({Phase.DECODE})
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [256, 512, 1024]}

    budget: int = knob(1024, low=1, high=_BIG, help="tokens read per step per selection row")
    sink: int = knob(4, low=0, high=_BIG, help="first tokens always read")
    window: int = knob(64, low=0, high=_BIG, help="most recent tokens always read")
    index: str = knob("hnsw", choices=INDEXES, help="faiss index: hnsw graph or exact flat")
    hnsw_m: int = knob(32, low=2, high=512, help="hnsw: links per graph node")
    ef_search: int = knob(64, low=1, high=_BIG, help="hnsw: candidate list size of a search")
    per_query_head: bool = knob(False, choices=(False, True), help="search per query head")
    report_recall: bool = knob(False, choices=(False, True), help="count recall of true top-k")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.name, self.budget, self.sink, self.window)
        import_faiss()

    @property
    def state_key(self) -> str:
        ef_search = max(self.ef_search, self.budget) if self.index == "hnsw" else 0
        return f"{self.name}:{self.index}:{self.hnsw_m}:{ef_search}"

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> TokenSelection | None:
        if self.budget >= ctx.kv_len and self.dense_when_covered:
            return None  # the budget covers the cache: dense
        queries = self.search_queries(q, ctx)  # (B, Hs, D)
        found = self.search(queries, view, ctx)  # (B, Hs, budget)
        if self.report_recall:
            self.count_recall(queries, found, view, ctx)
        return self.merge_forced(found, ctx)

    def search_queries(self, q: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """(B, Hq, 1, D) -> (B, Hs, D) fp32: every query head, or each GQA group's mean."""
        queries = q[:, :, 0].float()  # (B, Hq, D)
        if self.per_query_head:
            return queries
        return queries.view(ctx.batch, ctx.num_kv_heads, ctx.groups, -1).mean(2)  # (B, Hkv, D)

    def search(
        self, queries: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> torch.Tensor:
        """(B, Hs, D) queries -> (B, Hs, budget) long slots, best first, -1 where none."""
        indexes = self.indexes(view, ctx).indexes
        B, Hs, D = queries.shape
        rows = Hs // ctx.num_kv_heads  # query rows per KV head's index
        host = queries.detach().cpu().numpy().reshape(B * ctx.num_kv_heads, rows, D)
        found = np.empty((B * ctx.num_kv_heads, rows, self.budget), dtype=np.int64)
        for i, index in enumerate(indexes):
            found[i] = index.search(host[i], self.budget)[1]
        return torch.from_numpy(found).view(B, Hs, self.budget).to(queries.device)

    def indexes(self, view: DecodeView, ctx: AttentionContext) -> KeyIndexes:
        """This layer's indexes, extended with the latest write (rebuilt if that cannot be)."""
        state: KeyIndexes | None = view.state.get(self.state_key)
        start, stop = view.last_write
        held = view.keys.shape[2]
        count = view.keys.shape[0] * view.keys.shape[1]
        current = state is not None and len(state.indexes) == count
        if current and state.writes == view.writes and state.size == held:
            return state  # already includes this step
        next_update = current and state.writes == view.writes - 1
        appended = next_update and start == state.size < stop == held
        in_place = next_update and start < stop <= state.size == held  # a ring overwrote slots
        rewritten = [view.rewritten] if view.rewritten[1] > view.rewritten[0] else []
        if appended or in_place:
            replaced = [(start, stop)] if in_place else []
            self.replace(state, view.keys, self.indexed(ctx), replaced + rewritten)
            if appended:
                self.add(state.indexes, view.keys, self.indexed(ctx), start, stop)
            state.size, state.writes = held, view.writes
        if not (appended or in_place) or state.stale > held:
            state = KeyIndexes(self.new_indexes(count, view.keys.shape[3]), held, view.writes)
            self.add(state.indexes, view.keys, self.indexed(ctx), 0, held)
        view.state[self.state_key] = state
        return state

    def replace(
        self,
        state: KeyIndexes,
        keys: torch.Tensor,
        indexed: torch.Tensor,
        ranges: list[tuple[int, int]],
    ) -> None:
        """Give the slots of ``ranges`` (each [start, stop) of held slots whose keys changed in
        place) their current vectors: a flat index drops the old ones first; a graph index
        keeps them, counted in ``state.stale``."""
        faiss = import_faiss()
        for start, stop in ranges:
            if self.index == "flat":
                for index in state.indexes:
                    index.remove_ids(faiss.IDSelectorRange(start, stop))
            else:
                state.stale += stop - start
            self.add(state.indexes, keys, indexed, start, stop)

    def new_indexes(self, count: int, dim: int) -> list:
        faiss = import_faiss()
        indexes = []
        for _ in range(count):
            if self.index == "flat":
                inner = faiss.IndexFlatIP(dim)
            else:
                inner = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efSearch = max(self.ef_search, self.budget)
            indexes.append(faiss.IndexIDMap(inner))
        return indexes

    @staticmethod
    def add(indexes: list, keys: torch.Tensor, indexed: torch.Tensor, start: int, stop: int):
        """Add the keys of slots [start, stop) that ``indexed`` (B, 1|Hkv, Lk) marks, by slot id."""
        B, H, _, D = keys.shape
        part = keys[:, :, start:stop].detach().float().cpu().numpy()  # (B, H, n, D)
        marked = indexed[:, :, start:stop].expand(B, H, -1).cpu().numpy()  # (B, H, n)
        slots = np.arange(start, stop, dtype=np.int64)
        for b in range(B):
            for h in range(H):
                keep = marked[b, h]
                if keep.any():
                    vectors = np.ascontiguousarray(part[b, h][keep])
                    indexes[b * H + h].add_with_ids(vectors, slots[keep])

    @staticmethod
    def indexed(ctx: AttentionContext) -> torch.Tensor:
        """(B, 1 or Hkv, Lk) bool: slots that hold a key (neither padding nor an empty slot)."""
        held = key_positions(ctx) != EMPTY_POSITION  # (B or 1, 1 or Hkv, Lk)
        if ctx.key_valid is not None:
            held = held & ctx.key_valid[:, None, :]
        return held.expand(ctx.batch, -1, -1)

    def merge_forced(self, found: torch.Tensor, ctx: AttentionContext) -> TokenSelection:
        """Forced tokens first, then the retrieved ones in rank order: ``budget`` per row.

        Args:
            found: (B, Hs, R) long slots best first, -1 where the index returned fewer.
        """
        B, Hs, R = found.shape
        L = ctx.kv_len
        rank = torch.arange(R, 0, -1, dtype=torch.float32, device=found.device)  # R .. 1
        scores = torch.full((B, Hs, L + 1), float("-inf"), device=found.device)
        scores.scatter_(-1, found.masked_fill(found < 0, L), rank.expand(B, Hs, R))
        scores = scores[..., :L]  # (B, Hs, Lk); the spare slot took the -1 entries
        visible = per_row(decode_key_mask(ctx)[:, :, 0], Hs, ctx)  # (B, 1 or Hs, Lk)
        forced = per_row(forced_tokens(ctx, self.sink, self.window), Hs, ctx)
        scores = scores.masked_fill(~visible, float("-inf"))
        scores = scores.masked_fill(forced & visible, float("inf"))
        top = scores.topk(min(self.budget, L), dim=-1)
        return TokenSelection(indices=top.indices, valid=top.values > float("-inf"))

    def count_recall(
        self, queries: torch.Tensor, found: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> None:
        """Count how many of each search row's true top ``budget`` indexed keys were found."""
        B, Hs, D = queries.shape
        keys = view.keys.float()  # (B, Hkv, Lk, D)
        rows = queries.view(B, ctx.num_kv_heads, Hs // ctx.num_kv_heads, D)
        exact = torch.matmul(rows, keys.transpose(-1, -2)).view(B, Hs, -1)  # (B, Hs, Lk)
        indexed = per_row(self.indexed(ctx), Hs, ctx)
        exact = exact.masked_fill(~indexed, float("-inf"))
        true = exact.topk(self.budget, dim=-1)
        in_true = torch.zeros(B, Hs, ctx.kv_len + 1, dtype=torch.bool, device=found.device)
        in_true.scatter_(-1, true.indices, true.values > float("-inf"))
        hits = in_true.gather(-1, found.masked_fill(found < 0, ctx.kv_len))
        view.count("retrieval_recall_hits", hits.sum())
        view.count("retrieval_recall_total", (true.values > float("-inf")).sum())

"""One layer's sparse attention over vLLM's paged KV cache (no vLLM import).

The vLLM backend (``backend.py``) hands each call here once vLLM has written the step's keys
and values into the cache. A ``LayerRunner`` decides, on the host, which sequences of the
batch run sparse (``plan``), then:

- **prefill** (a whole prompt or a later chunk): each sequence's visible keys are read from
  its blocks (``layout.gather_sequence``), the prefill method selects tiles for the new
  queries against all of them (``q_offset`` = the tokens computed before the chunk), and
  sparseattn's tile kernel runs them (``backends.tiles.attend_tiles``: the C++ kernel on CPU
  float32, FlexAttention elsewhere); outputs go back to the sequence's rows of the batch.
- **decode**: every decoding sequence reads a fixed budget of pages per KV head, in one
  batched gather. Quest (arXiv:2406.10774) scores pages from per-page key bounds that live
  beside the cache (``PageBounds``: one entry per (block, page of the block), refreshed from
  the cache for every page a step writes); streaming and strided read their static pages.

The calls that do not run sparse (short, dense layers, phases without a method) are returned
to the backend, which runs vLLM's own kernel on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..backends.masks import BlockLayout
from ..backends.tiles import attend_tiles, density_once, select_once
from ..methods.base import Method
from ..methods.decode.quest import Quest
from ..methods.static import Dense
from ..types import AttentionContext, DecodeView, PageSelection, Phase, TokenSelection
from .config import PluginConfig
from .layout import BatchLayout, gather_pages, gather_sequence, page_slots, touched_pages

_NO_KEYS = torch.empty(0)


@dataclass(frozen=True)
class LayerShape:
    """What the backend knows of one attention layer."""

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    scaling: float
    block_size: int  # vLLM's cache block size
    softcap: float | None = None


@dataclass
class CallPlan:
    """Which sequences of one call run sparse; the rest run vLLM's own kernel."""

    prefill: list[int] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)
    decode_pages: dict[int, PageSelection | TokenSelection] = field(default_factory=dict)

    @property
    def sparse(self) -> list[int]:
        return sorted(self.prefill + self.decode)


@dataclass
class Counters:
    """Pairs computed and visible per phase (host numbers, read by the log and the tests)."""

    computed: dict[str, float] = field(default_factory=dict)
    visible: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, computed: float, visible: float) -> None:
        self.computed[phase] = self.computed.get(phase, 0.0) + computed
        self.visible[phase] = self.visible.get(phase, 0.0) + visible

    def density(self, phase: str) -> float | None:
        visible = self.visible.get(phase, 0.0)
        return None if visible == 0 else self.computed[phase] / visible


class PageBounds:
    """Quest's per-page key bounds for one layer, keyed by cache page: (nb * S, Hkv, 2D)
    [max | min] where page ``block * S + j`` holds slots [j * P, (j + 1) * P) of a block.

    vLLM may hand a block to another sequence at any step, so the bounds of every page a step
    writes are recomputed from the cache over the tokens the page holds (never from stale
    slots past the sequence's length); pages no step writes keep their bounds (a prefix-cached
    block is never rewritten while it is shared).
    """

    def __init__(self, key_cache: torch.Tensor, page_size: int) -> None:
        nb, Hkv, bs, D = key_cache.shape
        self.page_size = page_size
        self.bounds = torch.zeros(nb * bs // page_size, Hkv, 2 * D, dtype=torch.float32)
        self.bounds = self.bounds.to(key_cache.device)

    def refresh(
        self, key_cache: torch.Tensor, block_table: torch.Tensor, layout: BatchLayout
    ) -> None:
        """Recompute the bounds of the pages this step wrote (after vLLM wrote the keys)."""
        P = self.page_size
        seqs, pages, fill = touched_pages(layout, P)
        if not seqs:
            return
        dev = key_cache.device
        rows = block_table.index_select(0, torch.tensor(seqs, device=dev))  # (nW, max blocks)
        logical = torch.tensor(pages, device=dev).view(-1, 1, 1)  # (nW, 1, 1)
        first = page_slots(rows, logical, key_cache.shape[2], P)  # (nW, 1, 1)
        Hkv = key_cache.shape[1]
        heads = torch.arange(Hkv, device=dev)
        first = first.expand(-1, Hkv, 1)  # (nW, Hkv, 1)
        keys = gather_pages(key_cache, first, heads, P, transposed=True).float()  # (nW,Hkv,D,P)
        held = torch.arange(P, device=dev)[None, :] < torch.tensor(fill, device=dev)[:, None]
        held = held[:, None, None, :]  # (nW, 1, 1, P)
        high = keys.masked_fill(~held, float("-inf")).amax(-1)  # (nW, Hkv, D)
        low = keys.masked_fill(~held, float("inf")).amin(-1)
        self.bounds.index_copy_(0, first[:, 0, 0] // P, torch.cat([high, low], -1))


class LayerRunner:
    """Sparse attention of one layer on vLLM's paged cache (the state it keeps: page bounds)."""

    def __init__(self, config: PluginConfig, shape: LayerShape) -> None:
        prefill, decode, _ = config.setting.parts
        self.config, self.shape = config, shape
        self.prefill_method = _phase_method(prefill, Phase.PREFILL, shape, config)
        self.decode_method = _phase_method(decode, Phase.DECODE, shape, config)
        self.bounds: PageBounds | None = None
        self.counters = Counters()
        if isinstance(self.decode_method, Quest) and shape.block_size % decode.block_size:
            raise ValueError(
                f"quest block_size={decode.block_size} must divide vLLM's block size "
                f"{shape.block_size} (its pages are kept per cache block)"
            )

    @property
    def active(self) -> bool:
        return self.prefill_method is not None or self.decode_method is not None

    # -- which sequences run sparse -----------------------------------------------------
    def plan(self, layout: BatchLayout) -> CallPlan:
        plan = CallPlan()
        floor = self.config.min_length
        if self.prefill_method is not None:
            plan.prefill = [i for i in layout.prefills if layout.seq_lens[i] >= floor]
        method = self.decode_method
        if method is None:
            return plan
        for i in layout.decodes:
            if layout.seq_lens[i] < floor:
                continue
            if isinstance(method, Quest):
                if quest_keep(method, layout.seq_lens[i]) is not None:
                    plan.decode.append(i)
                continue
            selection = method.select_decode(
                _NO_KEYS, DecodeView(_NO_KEYS), self._ctx_decode(layout.seq_lens[i])
            )
            if selection is not None:
                plan.decode.append(i)
                plan.decode_pages[i] = selection
        return plan

    # -- state ----------------------------------------------------------------------------
    def after_write(
        self, key_cache: torch.Tensor, block_table: torch.Tensor, layout: BatchLayout
    ) -> None:
        """Keep Quest's page bounds in step with the cache (every step, whatever runs)."""
        if not isinstance(self.decode_method, Quest):
            return
        if self.bounds is None:
            self.bounds = PageBounds(key_cache, self.decode_method.block_size)
        self.bounds.refresh(key_cache, block_table, layout)

    # -- prefill --------------------------------------------------------------------------
    def prefill(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        layout: BatchLayout,
        seqs: list[int],
        output: torch.Tensor,
    ) -> None:
        """Sparse prefill of ``seqs``: writes their rows of ``output`` (T, Hq, Dv)."""
        for i in seqs:
            start, stop = layout.query_start[i], layout.query_start[i + 1]
            length = layout.seq_lens[i]
            k = gather_sequence(key_cache, block_table[i], length)  # (1, Hkv, L, D)
            v = gather_sequence(value_cache, block_table[i], length)
            q = query[start:stop].transpose(0, 1)[None].contiguous()  # (1, Hq, Lq, D)
            out, computed, visible = prefill_sequence(
                self.prefill_method,
                self.config.prefill_backend,
                q,
                k,
                v,
                layout.q_offsets[i],
                self.shape,
            )
            output[start:stop] = out[0].to(output.dtype)
            self.counters.add("prefill", computed, visible)

    # -- decode ---------------------------------------------------------------------------
    def decode(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_table: torch.Tensor,
        layout: BatchLayout,
        plan: CallPlan,
        output: torch.Tensor,
    ) -> None:
        """Sparse decode of ``plan.decode``, batched: writes their rows of ``output``."""
        seqs = plan.decode
        tokens = torch.tensor([layout.query_start[i] for i in seqs], device=query.device)
        q = query.index_select(0, tokens)  # (Bd, Hq, D)
        rows = block_table.index_select(0, torch.tensor(seqs, device=query.device))
        lengths = [layout.seq_lens[i] for i in seqs]
        if isinstance(self.decode_method, Quest):
            out = quest_decode(
                self.decode_method,
                q,
                key_cache,
                value_cache,
                rows,
                lengths,
                self.bounds,
                self.shape,
            )
        else:
            selections = [plan.decode_pages[i] for i in seqs]
            out = pages_decode(q, key_cache, value_cache, rows, lengths, selections, self.shape)
        output.index_copy_(0, tokens, out.to(output.dtype))
        budget = _decode_budget(self.decode_method, plan, seqs)
        self.counters.add("decode", float(budget), float(sum(lengths)))

    def _ctx_decode(self, length: int) -> AttentionContext:
        return decode_context(self.shape, length, 1)


def _phase_method(
    method: Method, phase: Phase, shape: LayerShape, config: PluginConfig
) -> Method | None:
    """The layer's method for a phase, or None where vLLM's own kernel runs every call."""
    if isinstance(method, Dense) or not method.supports(phase):
        return None
    if shape.layer_idx in config.dense_layers:
        return None
    if isinstance(method, Quest) and shape.layer_idx < method.full_layers:
        return None  # the paper keeps its first layers dense
    return method


def _decode_budget(method: Method, plan: CallPlan, seqs: list[int]) -> float:
    """Keys read per query head, summed over the decoding sequences (host numbers)."""
    if isinstance(method, Quest):
        return float(len(seqs) * (quest_keep(method, 0) or 0) * method.block_size)
    total = 0.0
    for i in seqs:
        selection = plan.decode_pages[i]
        if isinstance(selection, PageSelection):
            total += selection.valid.sum().item() * selection.page_size / selection.valid.shape[1]
        else:
            total += selection.valid.sum().item() / selection.valid.shape[1]
    return total


def prefill_context(
    shape: LayerShape, q_len: int, kv_len: int, q_offset: int, device
) -> AttentionContext:
    """The AttentionContext of one sequence's prompt chunk (contiguous, unpadded keys)."""
    return AttentionContext(
        layer_idx=shape.layer_idx,
        phase=Phase.PREFILL if q_offset == 0 else Phase.CHUNKED_PREFILL,
        batch=1,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=q_offset,
        kv_offset=0,
        num_q_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        scaling=shape.scaling,
        softcap=shape.softcap,
        device=device,
    )


def decode_context(shape: LayerShape, length: int, batch: int, device=None) -> AttentionContext:
    """The AttentionContext of a decode step over ``length`` held keys (the query is the last)."""
    return AttentionContext(
        layer_idx=shape.layer_idx,
        phase=Phase.DECODE,
        batch=batch,
        q_len=1,
        kv_len=length,
        q_offset=length - 1,
        kv_offset=0,
        num_q_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        scaling=shape.scaling,
        softcap=shape.softcap,
        device=torch.device("cpu") if device is None else device,
    )


def prefill_sequence(
    method: Method,
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int,
    shape: LayerShape,
) -> tuple[torch.Tensor, float, float]:
    """One sequence's prompt chunk through the method's tiles and sparseattn's tile kernel.

    Args:
        q: (1, Hq, Lq, D) the chunk's queries (positions q_offset ...).
        k: (1, Hkv, Lk, D) every key the chunk sees (Lk = q_offset + Lq).
        v: (1, Hkv, Lk, Dv).

    Returns:
        (1, Lq, Hq, Dv) output, and the (query, key) pairs computed and visible.
    """
    ctx = prefill_context(shape, q.shape[2], k.shape[2], q_offset, q.device)
    layout = BlockLayout(ctx, method.block_size)
    selection = select_once(method, q, k, ctx, layout)
    out = attend_tiles(backend, q, k, v, selection, ctx, layout)
    computed, visible = density_once(layout, selection)
    return out, float(computed.sum()), float(visible.sum())


def quest_keep(method: Quest, length: int) -> int | None:
    """Pages a Quest decode step reads over ``length`` keys (the rule of ``Quest.select_decode``),
    or None where the budget covers the cache (dense). ``length`` 0: the budget alone."""
    P = method.block_size
    forced_at_most = -(-method.sink // P) + -(-method.window // P) + 2
    keep = max(method.budget // P, forced_at_most)
    if length == 0:
        return keep
    n_pages = -(-length // P)
    return None if keep >= n_pages else keep


def quest_pages(
    method: Quest,
    q: torch.Tensor,
    bounds: torch.Tensor,
    lengths: list[int],
    scaling: float,
) -> torch.Tensor:
    """(Bd, Hkv, keep - 1) logical pages each decoding sequence reads besides its current page.

    The rule of ``Quest.select_decode`` on a contiguous unpadded cache, batched over sequences
    of different lengths: each query head's softmax over its page upper bounds
    (sum_d max(q_d min_d, q_d max_d)), summed over the heads of a KV head, plus +inf on the
    sink and window pages; the current page is read as the tail; pages past a sequence's
    length score -inf.

    Args:
        q: (Bd, Hq, D) the decode queries.
        bounds: (Bd, nP, Hkv, 2D) [max | min] of each sequence's logical pages (nP: the most).
        lengths: (Bd) keys each sequence holds.
    """
    P, dev = method.block_size, q.device
    Bd, Hq, D = q.shape
    nP, Hkv = bounds.shape[1], bounds.shape[2]
    rows = q.float().view(Bd, Hkv, Hq // Hkv, D) * scaling  # (Bd, Hkv, g, D)
    positive = rows.clamp(min=0)
    bounds = bounds.permute(0, 2, 1, 3)  # (Bd, Hkv, nP, 2D)
    scores = torch.matmul(torch.cat([positive, rows - positive], -1), bounds.mT)  # (Bd,Hkv,g,nP)
    length = torch.tensor(lengths, device=dev)[:, None]  # (Bd, 1)
    first = torch.arange(nP, device=dev)[None] * P  # (1, nP)
    held = first < length  # (Bd, nP)
    scores = scores.masked_fill(~held[:, None, None], float("-inf"))
    scores = torch.softmax(scores, dim=-1).sum(2)  # (Bd, Hkv, nP) the group's soft vote
    last = torch.minimum(first + P - 1, length - 1)
    forced = (first < method.sink) | (last > length - 1 - max(method.window, 1))
    current = first // P == (length - 1) // P
    bias = torch.zeros(Bd, nP, device=dev).masked_fill(forced & held, float("inf"))
    bias = bias.masked_fill(current | ~held, float("-inf"))
    keep = quest_keep(method, 0)
    return (scores + bias[:, None]).topk(keep - 1, dim=-1).indices


def quest_decode(
    method: Quest,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: list[int],
    bounds: PageBounds,
    shape: LayerShape,
) -> torch.Tensor:
    """Quest decode of a batch of sequences over the paged cache. Returns (Bd, Hq, Dv).

    Args:
        q: (Bd, Hq, D).
        block_table: (Bd, max blocks) the decoding sequences' rows.
        bounds: The layer's page bounds, refreshed with this step's writes.
    """
    P, dev = method.block_size, q.device
    Bd, Hkv = q.shape[0], key_cache.shape[1]
    nP = -(-max(lengths) // P)
    logical = torch.arange(nP, device=dev).expand(Bd, 1, nP)  # (Bd, 1, nP)
    first = page_slots(block_table, logical, shape.block_size, P)[:, 0]  # (Bd, nP)
    page_bounds = bounds.bounds.index_select(0, (first // P).flatten()).view(Bd, nP, Hkv, -1)
    chosen = quest_pages(method, q, page_bounds, lengths, shape.scaling)  # (Bd, Hkv, k - 1)
    current = torch.tensor([(n - 1) // P for n in lengths], device=dev)
    pages = torch.cat([chosen, current.view(Bd, 1, 1).expand(Bd, Hkv, 1)], -1)  # (Bd, Hkv, k)
    return _attend_pages(q, key_cache, value_cache, block_table, lengths, pages, P, shape)


def pages_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: list[int],
    selections: list[PageSelection | TokenSelection],
    shape: LayerShape,
) -> torch.Tensor:
    """Decode of a batch over each sequence's static pages (streaming, strided): the pages
    (rows per KV head or per query head) padded to one width, read in one gather.
    Returns (Bd, Hq, Dv)."""
    dev, Bd = q.device, q.shape[0]
    P = selections[0].page_size
    width = max(s.pages.shape[-1] for s in selections)
    Hs = selections[0].pages.shape[1]
    pages = torch.zeros(Bd, Hs, width, dtype=torch.long, device=dev)
    valid = torch.zeros(Bd, Hs, width, dtype=torch.bool, device=dev)
    for row, s in enumerate(selections):
        n = s.pages.shape[-1]
        pages[row, :, :n] = s.pages[0]
        valid[row, :, :n] = s.valid[0]
    return _attend_pages(q, key_cache, value_cache, block_table, lengths, pages, P, shape, valid)


def _attend_pages(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: list[int],
    pages: torch.Tensor,
    page_size: int,
    shape: LayerShape,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend each decode query to its logical pages (Bd, Hs, n) of ``page_size`` tokens.

    A page is read as units of U = gcd(P, bs) tokens, each inside one vLLM block, with one
    gather per cache; keys past a sequence's length or of invalid entries are masked. Rows per
    KV head run the g query heads of the group against one gather. Returns (Bd, Hq, Dv).
    """
    Bd, Hq, D = q.shape
    Hkv, bs, dev = key_cache.shape[1], shape.block_size, q.device
    Hs, n = pages.shape[1], pages.shape[2]
    P, U = page_size, math.gcd(page_size, bs)
    positions = (pages[..., None] * P + torch.arange(P, device=dev)).flatten(2)  # (Bd, Hs, nP)
    length = torch.tensor(lengths, device=dev).view(Bd, 1, 1)
    visible = positions < length  # (Bd, Hs, n * P)
    if valid is not None:
        visible = visible & valid[..., None].expand(Bd, Hs, n, P).flatten(2)
    units = positions[..., ::U].clamp(max=length - 1) // U  # (Bd, Hs, n * P / U), held units
    first = page_slots(block_table, units, bs, U)
    heads = torch.arange(Hs, device=dev) // (1 if Hs == Hkv else Hq // Hkv)
    k_t = gather_pages(key_cache, first, heads, U, transposed=True)  # (Bd, Hs, D, n * P)
    v = gather_pages(value_cache, first, heads, U)  # (Bd, Hs, n * P, Dv)
    rows = q.view(Bd, Hkv, Hq // Hkv, D) if Hs == Hkv else q[:, :, None]  # (Bd, Hs, R, D)
    scores = torch.matmul(rows.float(), k_t.float()) * shape.scaling  # (Bd, Hs, R, n * P)
    if shape.softcap:
        scores = torch.tanh(scores / shape.softcap) * shape.softcap
    scores = scores.masked_fill_(~visible[:, :, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1), v.float())  # (Bd, Hs, R, Dv)
    return out.reshape(Bd, Hq, -1).to(q.dtype)

"""SeerAttention: a small trained gate per layer scores every tile from pooled Q and K."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..backends.masks import BlockLayout, num_blocks
from ..errors import UsageError
from ..profiles.gates import SeerGates, gates_for, load_gates
from ..registry import register_method
from ..types import AttentionContext, BlockSelection
from .base import PREFILL_PHASES, Method, knob
from .common import row_sink_tiles
from .estimators import keep_cumulative_mass


def pool_tiles(x: torch.Tensor, valid: torch.Tensor | None, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, nB, 3 D) float32: mean, max and min of each tile's valid tokens
    side by side (zero for a tile with none; the ragged last tile pools what it holds).

    Args:
        x: Queries or keys.
        valid: (B, L) bool, False for padding tokens (left out of the pools), or None.
        block: Tile size b.
    """
    B, H, L, D = x.shape
    x = x.float()
    if valid is None:  # whole tiles as a view, then the ragged last one
        full = L // block
        tiles = x[:, :, : full * block].view(B, H, full, block, D)
        parts = [torch.cat([tiles.mean(3), tiles.amax(3), tiles.amin(3)], -1)]
        if L > full * block:
            tail = x[:, :, full * block :]
            parts.append(
                torch.cat([tail.mean(2, True), tail.amax(2, True), tail.amin(2, True)], -1)
            )
        return torch.cat(parts, 2)  # (B, H, nB, 3 D)
    n = num_blocks(L, block)
    pad = n * block - L
    real = F.pad(valid, (0, pad), value=False).view(B, 1, n, block, 1)
    tiles = F.pad(x, (0, 0, 0, pad)).view(B, H, n, block, D)
    count = real.sum(3).clamp_min(1)  # (B, 1, nB, 1)
    mean = tiles.masked_fill(~real, 0.0).sum(3) / count
    empty = ~real.any(3)  # (B, 1, nB, 1)
    top = tiles.masked_fill(~real, float("-inf")).amax(3).masked_fill(empty, 0.0)
    low = tiles.masked_fill(~real, float("inf")).amin(3).masked_fill(empty, 0.0)
    return torch.cat([mean, top, low], -1)  # (B, H, nB, 3 D)


def rotate_tiles(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE (rotate-half form) on gate vectors at their tiles' first positions.

    Args:
        x: (B, H, n, d_gate) gate vectors, d_gate even.
        positions: (n,) long absolute position of each tile's first token.
        base: RoPE base; frequency i of d_gate / 2 is base^(-2 i / d_gate).
    """
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.to(torch.float64)[:, None] * inv[None]  # (n, half), exact in float64
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def query_valid(ctx: AttentionContext) -> torch.Tensor | None:
    """(B, Lq) bool: queries that are not padding (query i is key ``q_offset - kv_offset + i``)."""
    if ctx.key_valid is None:
        return None
    own = torch.arange(ctx.q_len, device=ctx.device) + (ctx.q_offset - ctx.kv_offset)
    return ctx.key_valid[:, own.clamp(0, ctx.kv_len - 1)]


def gate_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: AttentionContext,
    layout: BlockLayout,
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    rope_base: float,
) -> torch.Tensor:
    """(B, Hq, nQ, nK) float32 AttnGate logits, -inf on tiles with no visible pair.

    Each query head's pooled tiles go through its own projection, each KV head's pooled key
    tiles through theirs; both are rotated at their tiles' first positions, and a query head
    meets its KV head's key gates by one matmul per KV head (no copy per query head).

    Args:
        q: (B, Hq, Lq, D) queries as the attention call sees them (after RoPE).
        k: (B, Hkv, Lk, D) keys.
        q_proj: (Hq, 3 D, d_gate) one layer's query projection.
        k_proj: (Hkv, 3 D, d_gate) its key projection.
    """
    b = layout.block_size
    B, Hq = q.shape[:2]
    Hkv, g = ctx.num_kv_heads, ctx.groups
    pq = pool_tiles(q, query_valid(ctx), b)  # (B, Hq, nQ, 3D)
    pk = pool_tiles(k, ctx.key_valid, b)  # (B, Hkv, nK, 3D)
    qg = torch.einsum("bhnf,hfe->bhne", pq, q_proj)  # (B, Hq, nQ, dg)
    kg = torch.einsum("bhnf,hfe->bhne", pk, k_proj)  # (B, Hkv, nK, dg)
    q_first = torch.arange(layout.n_q_blocks, device=q.device) * b + ctx.q_offset
    k_first = torch.arange(layout.n_kv_blocks, device=q.device) * b + ctx.kv_offset
    qg = rotate_tiles(qg, q_first, rope_base)
    kg = rotate_tiles(kg, k_first, rope_base)
    nQ, dg = qg.shape[2:]
    rows = qg.reshape(B, Hkv, g * nQ, dg)  # query head h = kv g + j
    logits = torch.matmul(rows, kg.transpose(-1, -2)).view(B, Hq, nQ, -1) / math.sqrt(dg)
    return logits.masked_fill(~layout.visible[:, None], float("-inf"))


def top_fraction(probs: torch.Tensor, visible: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, H, nQ, nK) bool: per row the ceil(fraction x visible tiles) most probable tiles.

    Args:
        probs: (B, H, nQ, nK) gate probabilities.
        visible: (B, nQ, nK) bool tiles with a visible pair.
    """
    ranked = probs.masked_fill(~visible[:, None], -1.0)  # invisible tiles rank last
    rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    keep = torch.ceil(visible.sum(-1).double() * fraction).long().clamp_min(1)  # (B, nQ)
    return rank < keep[:, None, :, None]


@register_method
@dataclass
class SeerAttention(Method):
    """SeerAttention (Gao et al., 2024, arXiv:2410.13276): a learned gate chooses the tiles.

    Per layer an AttnGate pools each tile of queries and keys by mean, max and min (3 D
    features), projects them per query head and per KV head to ``d_gate``, rotates them with
    RoPE at the tile's first position, and scores tile (i, j) by q_i . k_j / sqrt(d_gate); a
    softmax over the key tiles the query tile sees (causal, the layer's window, padding) gives
    each key tile's probability. Every query tile keeps the fewest tiles holding ``threshold``
    of it (or, with ``topk`` > 0, that fraction of its visible tiles), plus the row's first
    tile (sink) and the diagonal. The gates are trained by self-distillation with the model
    frozen (``sparseattn profile --kind seer``: KL to the tile-max-pooled true attention).
    Choices where the paper is open or that differ from it: the gates pool the queries and
    keys the attention call receives, after the model's RoPE (the hook sees no other; the
    reference pools before RoPE), and their outputs get RoPE of their own with base 10000
    (stored in the gate file) at token positions, as the reference rotates them; the query
    projection is per query head, the key projection per KV head (the reference's layout);
    ``threshold`` is a cumulative mass as in XAttention (the reference keeps the tiles whose
    own probability exceeds its threshold); padding tokens are left out of the pools; layers
    with their own sliding window are not gated and keep every tile of their window.
    Cost: pooling O(L H D), projections O(L / b x H x 3 D x d_gate), tile logits
    O(Hq (L / b)^2 d_gate); ``last_stats(model).seconds()`` (with ``timing=True``) reports it
    apart from the attention: SmolLM2-135M at 2K on one CPU thread, 0.10 s of selection and
    1.2 s of attention over its 30 layers at density 0.66.
    """

    name: ClassVar[str] = "seer"
    paper: ClassVar[str] = (
        "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (arXiv:2410.13276)"
    )
    phases: ClassVar = PREFILL_PHASES
    dense_limit: ClassVar[dict] = {"threshold": 1.0}
    default_grid: ClassVar[dict] = {"threshold": [0.8, 0.9, 0.95]}

    block_size: int = knob(
        64, choices=(16, 32, 64, 128, 256), help="tile size b in tokens (the gates' own)"
    )
    gates: str = knob(
        "auto",
        help="'auto' (the shipped gates of the hooked model), a shipped name, or a .safetensors "
        "file written by `sparseattn profile --kind seer`",
    )
    threshold: float = knob(
        0.9, low=0.01, high=1.0, help="gate probability mass each query tile keeps (1 = dense)"
    )
    topk: float = knob(
        0.0,
        low=0.0,
        high=1.0,
        help="> 0: keep this fraction of each query tile's visible tiles instead of a threshold",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._gates: SeerGates | None = None
        self._on_device: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.gates != "auto":
            self._gates = load_gates(self.gates)
            self._gates.check_block_size(self.block_size)

    def bind(self, config: Any) -> None:
        if self.gates == "auto":
            self._gates = gates_for(config)
            self._gates.check_block_size(self.block_size)
            self._on_device.clear()
        elif self._gates is not None:
            self._gates.check_model(config)

    def dense(self) -> bool:
        return self.topk >= 1.0 or (self.topk == 0.0 and self.threshold >= 1.0)

    def weights(self, ctx: AttentionContext, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (Hq, 3 D, d_gate) and (Hkv, 3 D, d_gate) projections on q's device."""
        if self._gates is None:
            raise UsageError(
                "seer with gates='auto' needs the model: run it through sparse_attention(model, "
                "...), or pass gates=FILE.safetensors"
            )
        key = (ctx.layer_idx, str(q.device))
        if key not in self._on_device:
            wq, wk = self._gates.layer_weights(
                ctx.layer_idx, ctx.num_q_heads, ctx.num_kv_heads, q.shape[-1]
            )
            self._on_device[key] = (wq.to(q.device), wk.to(q.device))
        return self._on_device[key]

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        if self.dense() or ctx.sliding_window is not None:
            return layout.every_tile(ctx.num_q_heads)
        wq, wk = self.weights(ctx, q)
        logits = gate_logits(q, k, ctx, layout, wq, wk, self._gates.rope_base)
        probs = torch.softmax(logits, -1).nan_to_num_(0.0)  # (B, Hq, nQ, nK); padding rows 0
        if self.topk > 0.0:
            mask = top_fraction(probs, layout.visible, self.topk)
        else:
            mask = keep_cumulative_mass(probs, self.threshold)
        mask |= row_sink_tiles(layout, 1)[:, None]
        return layout.finalize(mask)

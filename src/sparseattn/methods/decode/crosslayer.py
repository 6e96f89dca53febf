"""Cross-layer token selection: a few layers choose the tokens, the layers after them reuse it.

TidalDecode and DELTA share this mechanism and differ only in which layers select. A selection
layer attends densely and publishes, per batch row, the positions of the ``budget`` tokens with
the most attention mass summed over all its query heads; the later layers of the same decode
step read only those tokens. The choice travels in ``DecodeView.shared`` (one dict per cache)
stamped with the step (``DecodeView.seen``) and the publishing layer, so a choice is never read
by another step, another cache or an earlier layer.

Tokens travel as positions, not slots. A reusing layer whose keys are contiguous finds slot
``position - kv_offset`` (the slot itself for a full layer); a layer with explicit positions (the
ring of a sliding-window layer, a layer an eviction policy compacted) looks each position up in
an inverse table of its own held positions, and a position it no longer holds is not read. Only
a layer that sees every earlier token may publish: a selection layer whose own sliding window
hides part of the history attends densely and publishes nothing. A reusing layer that finds no
choice of this step (its selection layer was kept dense by ``dense_layers`` or sees a window
only, or the cache is not sparseattn's) chooses for itself the same way and reads its choice
sparsely, publishing it for the layers after it when it sees the whole history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...backends.masks import key_positions, sink_positions
from ...backends.sdpa import decode_key_mask
from ...errors import UsageError
from ...types import EMPTY_POSITION, AttentionContext, DecodeView, Phase, TokenSelection
from ..base import Method, knob
from .tokens import check_budget, forced_tokens, kv_head_scores, top_tokens

_BIG = 2**31 - 1


@dataclass(frozen=True)
class Chosen:
    """Tokens a layer chose at one decode step, published for the layers after it.

    Attributes:
        positions: (B, K) long absolute positions, one choice per batch row.
        valid: (B, K) bool, False for entries that name no visible token.
        step: ``DecodeView.seen`` of the step that chose them.
        layer: The choosing layer.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    step: int
    layer: int


def choose_positions(
    q: torch.Tensor, keys: torch.Tensor, ctx: AttentionContext, budget: int, sink: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``budget`` positions with the most attention mass over every query head, per row.

    Each query head's exact softmax over its visible keys (softcap applied) is summed over all
    heads; the sink (each row's first ``sink`` valid positions), the last ``window`` positions
    and the current token come first.

    Args:
        q: (B, Hq, 1, D) the decode queries.
        keys: (B, Hkv, Lk, D) the layer's held keys.

    Returns:
        positions (B, K) long and valid (B, K) bool; K = budget (fewer only when the layer has
        fewer positions than that), static from lengths and knobs.
    """
    logits = kv_head_scores(q, keys, ctx) * ctx.scaling  # (B, Hkv, g, Lk)
    if ctx.softcap is not None:
        logits = torch.tanh(logits / ctx.softcap) * ctx.softcap
    visible = decode_key_mask(ctx)  # (B, 1 or Hkv, 1, Lk)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    mass = probs.sum(2)  # (B, Hkv, Lk): each KV head's query heads
    positions = key_positions(ctx)  # (B or 1, 1 or Hkv, Lk)
    B, Hkv, Lk = mass.shape
    if positions.shape[1] == 1:  # a slot names one position for every head: rank slots
        forced = forced_tokens(ctx, sink, window)
        chosen = top_tokens(mass.sum(1, keepdim=True), forced, budget, ctx).indices  # (B, 1, K)
        seen = visible[:, :, 0].any(1, keepdim=True).expand(B, 1, Lk)
        return positions.expand(B, 1, Lk).gather(-1, chosen)[:, 0], seen.gather(-1, chosen)[:, 0]
    # heads hold different positions (per-head eviction): add the mass up by position, over
    # runs of equal positions among the M = Hkv * Lk held entries (never over every position
    # seen, so the step's tensors follow what the layer holds)
    ordered, order = positions.expand(B, Hkv, Lk).flatten(1).sort(-1)  # (B, M)
    M = ordered.shape[1]
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.long().cumsum(-1) - 1  # (B, M) run of each entry, runs ascending by position
    by_run = mass.new_zeros(B, M).scatter_add_(1, run, mass.flatten(1).gather(1, order))
    seen = visible[:, :, 0].expand(B, Hkv, Lk).flatten(1).gather(1, order).float()
    held = mass.new_zeros(B, M).scatter_add_(1, run, seen) > 0  # (B, M) a visible position
    at = torch.full_like(ordered, EMPTY_POSITION).scatter_(1, run, ordered)  # (B, M) positions
    forced = sink_positions(at, ctx, sink) | (at > ctx.q_offset - max(window, 1))
    score = by_run.masked_fill(~held, float("-inf")).masked_fill(forced & held, float("inf"))
    chosen = score.topk(min(budget, M), dim=-1).indices  # (B, K) runs
    return at.gather(-1, chosen), held.gather(-1, chosen)


def positions_to_slots(
    positions: torch.Tensor, valid: torch.Tensor, ctx: AttentionContext
) -> TokenSelection:
    """(B, K) positions -> this layer's slots, one row per KV head (the choice is per batch row).

    Contiguous keys: slot = position - kv_offset. Explicit positions: each (row, head)'s held
    positions the query may see (the last ``sliding_window`` ones on a sliding layer) are
    sorted and each wanted position is found by binary search, so the step's tensors follow
    the Lk slots the layer holds, not the positions it has seen; a position the layer does not
    hold (or the query cannot see) is marked invalid.
    """
    B, K = positions.shape
    Hkv = ctx.num_kv_heads
    if ctx.contiguous:
        slots = positions - ctx.kv_offset  # (B, K)
        valid = valid & (slots >= 0) & (slots < ctx.kv_len)
        slots = slots.clamp(0, ctx.kv_len - 1)[:, None].expand(B, Hkv, K)
        return TokenSelection(indices=slots, valid=valid[:, None].expand(B, Hkv, K))
    held = ctx.key_positions.expand(B, -1, -1)  # (B, Hp, Lk)
    Hp, Lk = held.shape[1], held.shape[2]
    window = ctx.sliding_window
    first = max(ctx.q_offset + 1 - window, 0) if window is not None else 0  # first visible
    inside = (held >= first) & (held <= ctx.q_offset)
    ordered, order = torch.where(inside, held, EMPTY_POSITION).sort(-1)  # (B, Hp, Lk)
    wanted = positions[:, None].expand(B, Hp, K).contiguous()  # (B, Hp, K)
    at = torch.searchsorted(ordered, wanted).clamp_(max=Lk - 1)  # (B, Hp, K)
    found = (ordered.gather(2, at) == wanted) & (wanted < EMPTY_POSITION)
    slots = order.gather(2, at)  # (B, Hp, K)
    valid = valid[:, None] & found
    return TokenSelection(indices=slots.expand(B, Hkv, K), valid=valid.expand(B, Hkv, K))


def sees_history(ctx: AttentionContext) -> bool:
    """Whether the layer's own window hides no earlier token (so it may choose for others)."""
    return ctx.sliding_window is None or ctx.q_offset < ctx.sliding_window


@dataclass
class CrossLayer(Method):
    """Shared mechanism of TidalDecode and DELTA; subclasses say which layers select.

    Layers below ``full_layers`` attend densely. A selection layer attends densely and
    publishes its choice; every later layer reads the latest choice of the same step. A selection
    layer reads its keys twice: once for the exact scores of its choice, once in the dense SDPA
    that computes its output (the protocol returns a selection, not an output). The
    counters ``<name>_selections`` and ``<name>_reuses`` count, per batch row, the layer-steps
    that chose tokens and those that read a published choice.
    """

    phases: ClassVar = frozenset({Phase.DECODE})
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [256, 512, 1024]}

    budget: int = knob(1024, low=1, high=_BIG, help="tokens read per step by a reusing layer")
    sink: int = knob(0, low=0, high=_BIG, help="first tokens always read")
    window: int = knob(0, low=0, high=_BIG, help="most recent tokens always read")
    full_layers: int = knob(2, low=0, high=_BIG, help="first layers that attend densely")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.name, self.budget, self.sink, self.window)

    def bind(self, config: Any) -> None:
        self.model_layers(config)

    def model_layers(self, config: Any) -> int:
        """The model's decoder layers; UsageError when ``full_layers`` leaves none sparse."""
        text = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        layers = text.num_hidden_layers
        if self.full_layers >= layers:
            raise UsageError(
                f"{self.name}: knob full_layers={self.full_layers} leaves no sparse layer in a "
                f"model of {layers} layers; allowed: 0..{layers - 1}"
            )
        return layers

    @property
    def shared_key(self) -> str:
        return f"{self.name}:chosen"

    def selects(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (at or past ``full_layers``) is a selection layer: each
        cross-layer method says (``tidaldecode``: its two selection layers; ``delta``: every
        ``select_every``-th); this base is never registered itself."""
        raise NotImplementedError(f"{type(self).__name__} must say which layers select")

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> TokenSelection | None:
        if ctx.layer_idx < self.full_layers:
            return None
        if self.budget >= ctx.kv_len and self.dense_when_covered:
            return None  # the budget covers the cache: dense
        selection_layer = self.selects(ctx.layer_idx)
        if selection_layer and not sees_history(ctx):
            return None  # dense over its window; a layer that sees every token chooses
        chosen: Chosen | None = view.shared.get(self.shared_key)
        current = (
            chosen is not None
            and chosen.step == view.seen
            and chosen.layer < ctx.layer_idx
            and chosen.positions.shape[0] == ctx.batch
        )
        if selection_layer or not current:
            positions, valid = choose_positions(
                q, view.keys, ctx, self.budget, self.sink, self.window
            )
            view.count(f"{self.name}_selections", float(ctx.batch))
            if sees_history(ctx):
                view.shared[self.shared_key] = Chosen(positions, valid, view.seen, ctx.layer_idx)
            if selection_layer:
                return None  # attends densely; the layers after it read the choice
            return positions_to_slots(positions, valid, ctx)
        view.count(f"{self.name}_reuses", float(ctx.batch))
        return positions_to_slots(chosen.positions, chosen.valid, ctx)

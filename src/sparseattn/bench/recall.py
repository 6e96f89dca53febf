"""Recall benchmark: share of the true attention mass each method keeps, against its density.

Queries and keys are captured from a real forward pass (a dense pass through the hook with a
recording method), then every method selects on them and is scored against the oracle's exact
tile mass of the same layer: recall = kept mass / total mass, beside measured density.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..backends.masks import BlockLayout
from ..compat import cache_kwargs, output_cache
from ..integration.hf import sparse_attention
from ..methods.base import Method
from ..methods.oracle import true_tile_mass
from ..setting import Setting
from ..types import AttentionContext, BlockSelection, DecodeView, Phase
from .prefill import benchmark_input


@dataclass
class _Recorder(Method):
    """Runs dense and keeps (q, k, ctx) of the chosen layers; not registered."""

    name: ClassVar[str] = "recorder"
    layers: tuple[int, ...] = ()
    captured: dict[int, tuple] = field(default_factory=dict, repr=False)

    def select(self, q, k, ctx: AttentionContext, layout: BlockLayout) -> BlockSelection:
        if ctx.layer_idx in self.layers:
            self.captured[ctx.layer_idx] = (q.detach().clone(), k.detach().clone(), ctx)
        return layout.every_tile(ctx.num_q_heads)


@torch.inference_mode()
def capture_qk(model, input_ids: torch.Tensor, layers: tuple[int, ...]) -> dict[int, tuple]:
    """{layer: (q (B, Hq, L, D), k (B, Hkv, L, D), ctx)} from one dense forward pass."""
    recorder = _Recorder(layers=layers)
    with sparse_attention(model, recorder, min_length=0):
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return recorder.captured


@torch.inference_mode()
def run_recall_bench(
    model,
    tokenizer,
    settings: list[Setting],
    lengths: list[int],
    layers: tuple[int, ...],
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """One record per (length, setting, layer): measured density, recall of the true mass over
    every query and over the last query tile (``recall_last``)."""
    device = next(model.parameters()).device
    methods = [s.parts[0] for s in settings]  # prefill selection (settings of one method)
    for method in methods:
        method.bind(model.config)  # once: a profile is read and checked before any capture
    for length in lengths:
        captured = capture_qk(model, benchmark_input(tokenizer, length, seed).to(device), layers)
        for layer, (q, k, ctx) in sorted(captured.items()):
            per_size: dict[int, tuple[BlockLayout, torch.Tensor]] = {}  # layout, true mass
            for setting, method in zip(settings, methods):
                if method.block_size not in per_size:
                    layout = BlockLayout(ctx, method.block_size)
                    per_size[method.block_size] = layout, true_tile_mass(q, k, ctx, layout)
                layout, mass = per_size[method.block_size]
                selection = method.select(q, k, ctx, layout)
                computed, visible = layout.density(selection)
                yield {
                    "phase": "prefill",
                    "length": length,
                    "layer": layer,
                    "method": setting.family,
                    "setting": setting.label,
                    "density": round(float(computed.sum() / visible.sum()), 4),
                    "recall": round(float((mass * selection.mask).sum() / mass.sum()), 4),
                    # the last query tile alone (the question, the first answer token)
                    "recall_last": round(
                        float(
                            (mass[..., -1, :] * selection.mask[..., -1, :]).sum()
                            / mass[..., -1, :].sum()
                        ),
                        4,
                    ),
                }


# -- decode steps ----------------------------------------------------------------------------


@dataclass
class _DecodeRecorder(Method):
    """Decodes densely and keeps (q, held keys, ctx) of every layer at every step."""

    name: ClassVar[str] = "decode_recorder"
    phases: ClassVar = frozenset({Phase.DECODE})
    steps: list[dict[int, tuple]] = field(default_factory=list, repr=False)

    def select_decode(self, q, view: DecodeView, ctx: AttentionContext) -> None:
        if ctx.layer_idx == 0 or not self.steps:
            self.steps.append({})
        self.steps[-1][ctx.layer_idx] = (q.detach().clone(), view.keys.detach().clone(), ctx)
        return None


@torch.inference_mode()
def capture_decode(model, input_ids: torch.Tensor, prompt: int) -> list[dict[int, tuple]]:
    """Prefill ``input_ids[:, :prompt]`` densely, then feed the rest one token per step;
    per step {layer: (q (B, Hq, 1, D), held keys (B, Hkv, Lk, D), ctx)}."""
    recorder = _DecodeRecorder()
    with sparse_attention(model, decode=recorder, min_length=0):
        out = model(input_ids=input_ids[:, :prompt], use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        for position in range(prompt, input_ids.shape[1]):
            out = model(
                input_ids=input_ids[:, position : position + 1], **cache_kwargs(model, cache)
            )
    return recorder.steps


def decode_recall(q, keys, ctx: AttentionContext, selection) -> tuple[float, float]:
    """(density, recall) of one decode selection against the exact attention of the step."""
    from ..backends.gather import selection_slots, visible_slots
    from ..backends.sdpa import decode_key_mask
    from ..methods.estimators import grouped_scores

    B, Hq = q.shape[:2]
    scores = grouped_scores(q.float(), keys.float())[:, :, 0] * ctx.scaling  # (B, Hq, Lk)
    if ctx.softcap is not None:
        scores = torch.tanh(scores / ctx.softcap) * ctx.softcap
    visible = decode_key_mask(ctx)[:, :, 0]  # (B, 1 or Hkv, Lk)
    visible = visible.repeat_interleave(Hq // visible.shape[1], dim=1)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    if selection is None:
        return 1.0, 1.0
    slots, valid = selection_slots(selection)
    kept = visible_slots(slots, valid, ctx)  # (B, Hs, K)
    if slots.shape[1] != Hq:
        slots = slots.repeat_interleave(ctx.groups, 1)
        kept = kept.repeat_interleave(ctx.groups, 1)
    index = slots.clamp(max=ctx.kv_len - 1)
    recall = (probs.gather(-1, index) * kept).sum(-1).mean()
    density = kept.sum() / visible.sum().clamp_min(1)
    return float(density), float(recall)


@torch.inference_mode()
def run_decode_recall_bench(
    model,
    tokenizer,
    settings: list[Setting],
    lengths: list[int],
    layers: tuple[int, ...],
    steps: int = 4,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """One record per (length, setting, layer): density and recall of the true attention mass
    of decode selections on real decode steps, averaged over ``steps`` steps.

    Every layer of a step is selected in order with one shared dict, so methods that reuse one
    layer's choice in later layers (TidalDecode, DELTA) are scored as they run; state kept
    across steps (page bounds, selection caches) starts fresh at every captured step.
    """
    device = next(model.parameters()).device
    methods = [s.parts[1] for s in settings]  # the decode selection
    for method in methods:
        method.bind(model.config)
    for length in lengths:
        ids = benchmark_input(tokenizer, length + steps, seed).to(device)
        captured = capture_decode(model, ids, length)
        for setting, method in zip(settings, methods):
            sums: dict[int, list[float]] = {layer: [0.0, 0.0] for layer in layers}
            for step in captured:
                shared: dict = {}
                for layer, (q, keys, ctx) in sorted(step.items()):
                    view = DecodeView(keys, {}, 0, (0, 0), ctx.q_offset + 1, shared, {})
                    selection = method.select_decode(q, view, ctx)
                    if layer in sums:
                        density, recall = decode_recall(q, keys, ctx, selection)
                        sums[layer][0] += density
                        sums[layer][1] += recall
            for layer, (density, recall) in sums.items():
                yield {
                    "phase": "decode",
                    "length": length,
                    "layer": layer,
                    "method": setting.family,
                    "setting": setting.label,
                    "density": round(density / len(captured), 4),
                    "recall": round(recall / len(captured), 4),
                }

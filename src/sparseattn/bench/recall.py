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
from ..integration.hf import sparse_attention
from ..methods.base import Method
from ..methods.oracle import true_tile_mass
from ..setting import Setting
from ..types import AttentionContext, BlockSelection
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
    """One record per (length, setting, layer): measured density and recall of the true mass."""
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
                    "length": length,
                    "layer": layer,
                    "method": setting.family,
                    "setting": setting.label,
                    "density": round(float(computed.sum() / visible.sum()), 4),
                    "recall": round(float((mass * selection.mask).sum() / mass.sum()), 4),
                }

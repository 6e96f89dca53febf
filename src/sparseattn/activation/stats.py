"""Measured activation sparsity and weight bytes read per decode step.

Every stand-in module adds to a ``SiteCounter``: four int64 counters summed in place by the
kernel (active channels, i.e. the union over the step's rows; channels; kept (row, channel)
entries; entries) and a host count of calls. Nothing is read back until a figure is asked for.
Weight bytes per step are the model's parameters (each once; an untied input embedding is left
out: a step reads only its rows) less the columns or rows the sparse sites skipped, plus
R-Sparse's low-rank factors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SiteCounter:
    """One site (a linear layer of one decoder layer, or CATS's up / down pair).

    Attributes:
        counts: (4,) int64: active channels (union over rows), channels, kept entries, entries.
        channel_bytes: Weight bytes one active channel reads.
        extra_bytes: Bytes read per call besides the channels (a low-rank part).
        calls: Decode calls counted.
    """

    channel_bytes: int
    extra_bytes: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.long))
    calls: int = 0

    def reset(self) -> None:
        self.counts.zero_()
        self.calls = 0


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a dense decode step reads: every parameter once, less an input
    embedding that is not also the output projection (a step reads only its rows)."""
    seen: dict[int, int] = {}
    for tensor in model.parameters():
        seen.setdefault(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embed is not None and (head is None or head.weight.data_ptr() != embed.weight.data_ptr()):
        seen.pop(embed.weight.data_ptr(), None)
    return sum(seen.values())


@dataclass
class ActivationStats:
    """Counters of one ``sparse_attention(..., activation=...)`` block.

    Attributes:
        method: The method's label (e.g. 'cats[sparsity=0.5]').
        sites: {(layer, site name): counter}.
        dense_bytes: What a dense decode step reads (``model_weight_bytes``).
        steps: Decode steps seen.
    """

    method: str
    dense_bytes: int
    sites: dict[tuple[int, str], SiteCounter] = field(default_factory=dict)
    steps: int = 0

    def site(self, layer_idx: int, name: str, channel_bytes: int, extra: int = 0) -> SiteCounter:
        counter = SiteCounter(channel_bytes, extra)
        self.sites[(layer_idx, name)] = counter
        return counter

    def reset(self) -> None:
        """A new prompt starts a new run."""
        self.steps = 0
        for counter in self.sites.values():
            counter.reset()

    def _totals(self) -> dict[tuple[int, str], list[int]]:
        if not self.sites:
            return {}
        stacked = torch.stack([c.counts for c in self.sites.values()]).tolist()  # one read
        return dict(zip(self.sites, stacked))

    def sparsity(self, by: str = "projection", rows: bool = False) -> dict[Any, float]:
        """Measured share of channels skipped, per projection name (mean over layers), per
        layer (over its sites) or per (layer, projection) (``by``: 'projection', 'layer' or
        'site'). ``rows=False``: channels no row of a step kept (what the weights read
        follows); ``rows=True``: entries dropped per row (what the thresholds target)."""
        if by not in ("projection", "layer", "site"):
            raise ValueError(f"by={by!r}; allowed: 'projection', 'layer', 'site'")
        num, den = (2, 3) if rows else (0, 1)
        groups: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
        for (layer, name), counts in self._totals().items():
            key = {"projection": name, "layer": layer, "site": (layer, name)}[by]
            groups[key][0] += counts[num]
            groups[key][1] += counts[den]
        return {k: 1.0 - kept / total for k, (kept, total) in sorted(groups.items()) if total}

    def weight_bytes_per_step(self) -> float | None:
        """Mean weight bytes a decode step read (None before any decode step)."""
        if self.steps == 0:
            return None
        skipped = 0.0
        for (key, counts), counter in zip(self._totals().items(), self.sites.values()):
            skipped += (counts[1] - counts[0]) * counter.channel_bytes
            skipped -= counter.calls * counter.extra_bytes
        return self.dense_bytes - skipped / self.steps

    def summary(self) -> dict[str, Any]:
        """JSON-ready: overall sparsity (channels and rows), per projection and per layer,
        weight bytes per step against dense."""
        totals = self._totals()
        kept = sum(c[0] for c in totals.values())
        channels = sum(c[1] for c in totals.values())
        row_kept = sum(c[2] for c in totals.values())
        entries = sum(c[3] for c in totals.values())
        read = self.weight_bytes_per_step()
        return {
            "method": self.method,
            "steps": self.steps,
            "sparsity": None if not channels else round(1 - kept / channels, 4),
            "row_sparsity": None if not entries else round(1 - row_kept / entries, 4),
            "by_projection": {k: round(v, 4) for k, v in self.sparsity("projection").items()},
            "by_layer": {k: round(v, 4) for k, v in self.sparsity("layer").items()},
            "weight_bytes_per_step": None if read is None else round(read),
            "weight_bytes_dense": self.dense_bytes,
            "weight_read_ratio": None if read is None else round(read / self.dense_bytes, 4),
        }

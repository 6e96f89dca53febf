"""Measured density and timing, per layer and head, for the calls of one inference run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..types import Phase


@dataclass
class LayerStats:
    """Accumulated over the calls of one layer in one phase group (prefill or decode).

    Attributes:
        computed: (Hq,) float64 pairs computed, summed over calls and batch rows.
        visible: (Hq,) float64 pairs the dense model would compute.
    """

    layer_idx: int
    method: str
    calls: int = 0
    computed: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    select_s: float = 0.0
    attend_s: float = 0.0

    def add(
        self, computed: torch.Tensor, visible: torch.Tensor, select_s: float, attend_s: float
    ) -> None:
        computed, visible = computed.sum(0), visible.sum(0)  # (B, H) -> (H,)
        if self.computed is None:
            self.computed, self.visible = computed, visible
        else:
            self.computed, self.visible = self.computed + computed, self.visible + visible
        self.calls += 1
        self.select_s += select_s
        self.attend_s += attend_s

    @property
    def density(self) -> float:
        """Computed / visible pairs over all heads."""
        return float(self.computed.sum() / self.visible.sum().clamp_min(1))

    @property
    def head_density(self) -> list[float]:
        return (self.computed / self.visible.clamp_min(1)).tolist()


@dataclass
class RunStats:
    """Stats of the latest run: its prompt (all prefill chunks) and the decode steps after it."""

    prefill: dict[int, LayerStats] = field(default_factory=dict)
    decode: dict[int, LayerStats] = field(default_factory=dict)

    def record(
        self,
        layer_idx: int,
        phase: Phase,
        method: str,
        computed: torch.Tensor,
        visible: torch.Tensor,
        select_s: float,
        attend_s: float,
    ) -> None:
        if phase is Phase.PREFILL and layer_idx in self.prefill:  # a new prompt starts a new run
            self.prefill.clear()
            self.decode.clear()
        group = self.prefill if phase.is_prefill else self.decode
        if layer_idx not in group:
            group[layer_idx] = LayerStats(layer_idx, method)
        group[layer_idx].add(computed, visible, select_s, attend_s)

    def density(self, phase: str = "prefill") -> float | None:
        """Measured density of a phase ("prefill" or "decode") over all layers; None if unseen."""
        group = self._group(phase)
        if not group:
            return None
        computed = sum(float(s.computed.sum()) for s in group.values())
        visible = sum(float(s.visible.sum()) for s in group.values())
        return computed / max(visible, 1.0)

    def layer_density(self, phase: str = "prefill") -> dict[int, float]:
        return {i: s.density for i, s in sorted(self._group(phase).items())}

    def head_density(self, phase: str = "prefill") -> dict[int, list[float]]:
        return {i: s.head_density for i, s in sorted(self._group(phase).items())}

    def seconds(self, phase: str = "prefill") -> dict[str, float]:
        group = self._group(phase).values()
        return {
            "select_s": sum(s.select_s for s in group),
            "attend_s": sum(s.attend_s for s in group),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready: density and timing per phase, density per layer."""
        out: dict[str, Any] = {}
        for phase in ("prefill", "decode"):
            if self._group(phase):
                out[phase] = {
                    "density": self.density(phase),
                    **self.seconds(phase),
                    "layer_density": self.layer_density(phase),
                }
        return out

    def _group(self, phase: str) -> dict[int, LayerStats]:
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        return self.prefill if phase == "prefill" else self.decode


class Stopwatch:
    """perf_counter that waits for the device first, so GPU time is not under-counted."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

"""Measured density, KV bytes and (when asked) timing, per layer and head, for one inference run.

Counters stay on the device and are summed in place; nothing is read back to the host until a
figure is asked for (once per ``generate``, not once per token). Calls that attend densely to
every key add a Python number instead of touching the device at all.
"""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UsageError
from ..types import Phase


@dataclass
class LayerStats:
    """Accumulated over the calls of one layer in one phase group (prefill or decode).

    Attributes:
        methods: Calls per method name (a layer may run dense for short calls, sparse later).
        computed: (H,) float64 pairs computed, summed over calls and batch rows (device).
        visible: (H,) float64 pairs the dense model would compute (device).
        host_computed: Pairs per head computed by calls that counted them on the host (every
            head and row alike: dense calls, fixed-budget reads of an all-visible cache).
        host_visible: The visible pairs per head of those calls.
        group_host: Host counts of head-group calls (DuoAttention's full and streaming
            heads): per group's head-index tensor, [computed, visible] per head of the group,
            spread over the layer's heads only when read (no tensor work per decode call).
    """

    layer_idx: int
    methods: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    computed: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    host_computed: float = 0.0
    host_visible: float = 0.0
    group_host: dict[torch.Tensor, list] = field(default_factory=dict)
    select_s: float = 0.0
    attend_s: float = 0.0

    @property
    def method(self) -> str:
        """Every method this layer ran, most used first ('streaming+dense')."""
        return "+".join(sorted(self.methods, key=lambda m: -self.methods[m]))

    def add(
        self,
        method: str,
        computed: torch.Tensor | float,
        visible: torch.Tensor | float,
        select_s: float = 0.0,
        attend_s: float = 0.0,
        heads: tuple[torch.Tensor, int] | None = None,
    ) -> None:
        """Count one call.

        Args:
            computed: (B, H) pairs computed per row and head, or a host number of pairs per head
                (summed over rows) when every head and row computed the same.
            visible: (B, H) pairs the dense model computes, or a host number per head (summed
                over rows) when every key is visible.
            heads: For a call over some of the layer's query heads (a head group): their
                indices (h,) and the layer's head count; ``computed``/``visible`` cover those.
        """
        self.methods[method] = self.methods.get(method, 0) + 1
        self.calls += 1
        self.select_s += select_s
        self.attend_s += attend_s
        if not isinstance(computed, torch.Tensor) and not isinstance(visible, torch.Tensor):
            # counted on the host: no device work (a head group's, spread when read)
            if heads is None:
                self.host_computed += float(computed)
                self.host_visible += float(visible)
            else:
                entry = self.group_host.setdefault(heads[0], [0.0, 0.0, heads[1]])
                entry[0] += float(computed)
                entry[1] += float(visible)
            return
        if heads is not None:
            computed, visible = (_spread(x, *heads) for x in (computed, visible))
        if not isinstance(computed, torch.Tensor):
            computed = torch.full_like(visible, float(computed) / visible.shape[0])
        computed = computed.sum(0)  # (B, H) -> (H,)
        if self.computed is None:
            self.computed = torch.zeros_like(computed, dtype=torch.float64)
            self.visible = torch.zeros_like(self.computed)
        self.computed.add_(computed)
        self.visible.add_(visible.sum(0) if isinstance(visible, torch.Tensor) else visible)

    def totals(self, num_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(H,) computed and visible pairs per head, device counters and host numbers together."""
        if self.computed is None:
            groups = [entry[2] for entry in self.group_host.values()]
            heads = groups[0] if groups else num_heads or 1
            computed = torch.full((heads,), self.host_computed, dtype=torch.float64)
            visible = torch.full((heads,), self.host_visible, dtype=torch.float64)
        else:
            computed = self.computed + self.host_computed
            visible = self.visible + self.host_visible
        for index, (c, v, heads) in self.group_host.items():
            computed = computed + _spread(c, index, heads).sum(0).to(computed.device)
            visible = visible + _spread(v, index, heads).sum(0).to(visible.device)
        return computed, visible

    @property
    def density(self) -> float:
        """Computed / visible pairs over all heads."""
        computed, visible = self.totals()
        return float(computed.sum() / visible.sum().clamp_min(1))

    @property
    def head_density(self) -> list[float]:
        computed, visible = self.totals()
        return (computed / visible.clamp_min(1)).tolist()


def _spread(x: torch.Tensor | float, index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, h) counts of heads ``index`` (or one host number per head) -> (B or 1, H), zeros
    for the layer's other heads."""
    if not isinstance(x, torch.Tensor):
        x = torch.full((1, index.shape[0]), float(x), dtype=torch.float64, device=index.device)
    x = x.to(torch.float64).expand(-1, index.shape[0])
    out = torch.zeros(x.shape[0], num_heads, dtype=torch.float64, device=x.device)
    return out.index_copy_(1, index, x)


@dataclass
class RunStats:
    """Stats of the latest run: its prompt (all prefill chunks) and the decode steps after it."""

    prefill: dict[int, LayerStats] = field(default_factory=dict)
    decode: dict[int, LayerStats] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)  # methods' own, summed on device
    # activation sparsity's counters (an ``activation.ActivationStats``) when one is installed
    activation: Any = None
    _cache: Any = field(default=None, repr=False)

    def record(
        self,
        layer_idx: int,
        phase: Phase,
        method: str,
        computed: torch.Tensor | float,
        visible: torch.Tensor | float,
        select_s: float = 0.0,
        attend_s: float = 0.0,
        heads: tuple[torch.Tensor, int] | None = None,
    ) -> None:
        if phase is Phase.PREFILL and layer_idx in self.prefill and heads is None:
            # a new prompt starts a new run (a head group's call is part of the layer's)
            self.prefill.clear()
            self.decode.clear()
            self.counters.clear()
            if self.activation is not None:
                self.activation.reset()
        group = self.prefill if phase.is_prefill else self.decode
        if layer_idx not in group:
            group[layer_idx] = LayerStats(layer_idx)
        group[layer_idx].add(method, computed, visible, select_s, attend_s, heads)

    def bind_cache(self, cache: Any) -> None:
        """Remember the cache of the latest forward (weakly) to report what it holds."""
        self._cache = None if cache is None else weakref.ref(cache)

    def kv_bytes(self) -> int | None:
        """Bytes the latest forward's cache allocates now: KV storage with its headroom and
        empty slots, explicit positions, and every decode-method state (page bounds, label
        caches, ANN indexes, state shared across layers)."""
        from ..cache import cache_nbytes

        cache = self._cache() if self._cache is not None else None
        return None if cache is None else cache_nbytes(cache)

    def kv_held_bytes(self) -> int | None:
        """Bytes of the keys and values of the tokens the latest forward's cache holds (what
        a cache sized exactly to its content would take)."""
        from ..cache import cache_held_bytes

        cache = self._cache() if self._cache is not None else None
        return None if cache is None else cache_held_bytes(cache)

    def density(self, phase: str = "prefill") -> float | None:
        """Measured density of a phase ("prefill" or "decode") over all layers; None if unseen."""
        group = self._group(phase)
        if not group:
            return None
        totals = [s.totals() for s in group.values()]
        computed = sum(float(c.sum()) for c, _ in totals)
        visible = sum(float(v.sum()) for _, v in totals)
        return computed / max(visible, 1.0)

    def layer_density(self, phase: str = "prefill") -> dict[int, float]:
        return {i: s.density for i, s in sorted(self._group(phase).items())}

    def head_density(self, phase: str = "prefill") -> dict[int, list[float]]:
        return {i: s.head_density for i, s in sorted(self._group(phase).items())}

    def layer_methods(self, phase: str = "prefill") -> dict[int, str]:
        return {i: s.method for i, s in sorted(self._group(phase).items())}

    def seconds(self, phase: str = "prefill") -> dict[str, float]:
        """Selection and attention seconds of a phase (zero unless run with timing=True)."""
        group = self._group(phase).values()
        return {
            "select_s": sum(s.select_s for s in group),
            "attend_s": sum(s.attend_s for s in group),
        }

    def counter(self, name: str) -> float | None:
        """A method's counter summed over the run (e.g. ``tokenselect_hits``); None if unseen."""
        value = self.counters.get(name)
        return None if value is None else float(value)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: density and timing per phase, density per layer, KV bytes allocated
        (``kv_bytes``) and held (``kv_held_bytes``), activation sparsity and weight bytes per
        decode step (``activation``, when a method is installed), the methods' counters."""
        out: dict[str, Any] = {}
        for phase in ("prefill", "decode"):
            if self._group(phase):
                out[phase] = {
                    "density": self.density(phase),
                    **self.seconds(phase),
                    "layer_density": self.layer_density(phase),
                }
        out["kv_bytes"] = self.kv_bytes()
        out["kv_held_bytes"] = self.kv_held_bytes()
        if self.activation is not None:
            out["activation"] = self.activation.summary()
        if self.counters:
            out["counters"] = {name: self.counter(name) for name in sorted(self.counters)}
        return out

    def _group(self, phase: str) -> dict[int, LayerStats]:
        if phase not in ("prefill", "decode"):
            raise UsageError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        return self.prefill if phase == "prefill" else self.decode


DECODE_WARMUP = 2  # decode steps left out of a per-token time (first calls of a new shape)


def per_token_seconds(times: list[float]) -> float | None:
    """Seconds per decode step: the median over the steps after the first ``DECODE_WARMUP``
    (over all of them when there are no more). The one rule of ``bench decode`` and the
    frontier, so both report the same figure for the same setting."""
    if not times:
        return None
    kept = times[DECODE_WARMUP:] or times
    return statistics.median(kept)


def timed(device: torch.device | str) -> float:
    """perf_counter after waiting for the device, so GPU work is not under-counted.

    The one timer of the project: benchmarks, the frontier and ``timing=True`` all use it.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()

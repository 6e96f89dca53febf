"""Paired statistics against dense: bootstrap intervals of per-sample differences, verdicts.

Every setting runs on the same generated samples as dense, so the question "does it differ
from dense" is about the per-sample differences (setting - dense): their mean, and a 95%
percentile bootstrap interval, resampling samples with a fixed seed (the same report twice
gives the same intervals).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences and its bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """'better' / 'worse' when the interval excludes 0, else 'indistinguishable'."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "indistinguishable"


def bootstrap_interval(
    values: list[float], seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> Interval | None:
    """Percentile bootstrap interval of the mean of ``values`` (None when there are none).

    With one value, or values all equal, the interval is that value (no spread to resample).
    """
    if not values:
        return None
    data = torch.tensor(values, dtype=torch.float64)
    n = data.numel()
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(n, (resamples, n), generator=generator)
    means = data[picks].mean(-1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return Interval(float(data.mean()), float(low), float(high), n)


def paired_differences(mine: dict[int, dict], dense: dict[int, dict], key: str) -> list[float]:
    """Per-sample ``key`` of a setting minus dense's, over the samples both have."""
    return [
        float(mine[s][key]) - float(dense[s][key])
        for s in sorted(mine)
        if s in dense and mine[s].get(key) is not None and dense[s].get(key) is not None
    ]

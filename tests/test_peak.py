"""Peak memory is measured per setting: a small setting after a large one reports its own peak."""

from __future__ import annotations

import torch

from sparseattn.bench.peak import PeakMemory


def test_peak_memory_is_per_scope_not_since_process_start():
    with PeakMemory() as big:
        block = torch.ones(60_000_000)  # 240 MB
        block.add_(1)
        del block
    with PeakMemory() as small:
        block = torch.ones(5_000_000)  # 20 MB
        block.add_(1)
        del block
    assert big.peak_mb - big.start_mb > 200
    assert small.peak_mb - small.start_mb < 100
    assert small.peak_mb < big.peak_mb - 100

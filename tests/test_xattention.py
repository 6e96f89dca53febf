"""XAttention finds planted important tiles and tracks the oracle's mass."""

from __future__ import annotations

import pytest
import torch
from test_backends import make_call

from sparseattn.backends import BlockLayout
from sparseattn.methods.oracle import true_tile_mass
from sparseattn.registry import build_method


def planted_call(hot_tile: int, block: int = 32, length: int = 512, seed: int = 0):
    """Queries share a direction u; keys of one tile point along u, the rest are small noise."""
    q, k, v, ctx = make_call(length, length, batch=2, hq=4, hkv=2, d=16, seed=seed)
    u = torch.zeros(16)
    u[0] = 1.0
    q = 0.1 * q + 4.0 * u
    k = 0.1 * k
    k[0, :, hot_tile * block : (hot_tile + 1) * block] += 4.0 * u  # batch row 0 only
    return q, k, v, ctx


def test_finds_the_planted_tile_per_batch_row():
    q, k, v, ctx = planted_call(hot_tile=5)
    method = build_method("xattention", threshold=0.6, block_size=32, stride=8)
    layout = BlockLayout(ctx, 32)
    sel = method.select(q, k, ctx, layout).mask  # (B, H, nQ, nK)
    assert sel[0, :, 6:, 5].all(), "every later query tile of row 0 must keep the hot tile"
    assert not torch.equal(sel[0], sel[1]), "row 1 has no hot tile: its selection differs"
    assert sel[0].float().mean() < sel[1].float().mean()  # flat attention needs more tiles


def test_recall_of_true_mass_close_to_threshold():
    q, k, v, ctx = make_call(512, 512, batch=1, hq=2, hkv=1, d=16, seed=3)
    q = q * 3  # peakier attention than random unit-variance inputs
    layout = BlockLayout(ctx, 32)
    mass = true_tile_mass(q, k, ctx, layout)
    for threshold in (0.7, 0.9):
        sel = build_method("xattention", threshold=threshold, block_size=32, stride=8).select(
            q, k, ctx, layout
        )
        recall = (mass * sel.mask).sum() / mass.sum()
        assert recall > threshold - 0.15
    dense_recall = (mass * layout.visible[:, None]).sum() / mass.sum()
    assert dense_recall == pytest.approx(1.0)

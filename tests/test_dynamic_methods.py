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
    recalls = []
    for threshold in (0.7, 0.9):
        sel = build_method("xattention", threshold=threshold, block_size=32, stride=8).select(
            q, k, ctx, layout
        )
        recall = float((mass * sel.mask).sum() / mass.sum())
        computed, visible = layout.density(sel)
        density = float(computed.sum() / visible.sum())
        assert recall > threshold - 0.15
        assert density < 1.0, "keeping every tile would meet any recall target"
        assert recall > density, "the estimate must beat keeping tiles blindly"
        recalls.append(recall)
    assert recalls[0] < recalls[1], "a higher threshold recalls more"


def test_vertical_slash_finds_planted_column_and_diagonal():
    """Key 300 matches every query (a vertical line); key j matches query j + 100 (a slash)."""
    q, k, v, ctx = make_call(512, 512, batch=1, hq=2, hkv=1, d=16, seed=1)
    q, k = 0.05 * q, 0.05 * k
    code = torch.randn(512, 15, generator=torch.Generator().manual_seed(9))
    code = 3.0 * code / code.norm(dim=-1, keepdim=True)
    q[..., 1:] += code  # every query carries its own code...
    k[..., 100:, 1:] += code[:-100]  # ...and key j carries the code of query j + 100
    q[..., 0] += 3.0
    k[0, :, 300, 0] += 6.0  # one key every query likes
    layout = BlockLayout(ctx, 32)
    method = build_method(
        "vertical_slash", block_size=32, vertical_size=8, slash_size=8, last_queries=64
    )
    sel = method.select(q, k, ctx, layout).mask[0, 0]
    assert sel[10:, 300 // 32].all(), "the vertical line's tile is kept for every later query tile"
    for i in range(
        5, 16
    ):  # query tile i holds queries [32 i, 32 i + 31]; their slash keys are 100 earlier
        assert sel[i, (32 * i - 100) // 32] or sel[i, (32 * i + 31 - 100) // 32]
    assert sel.float().mean() < 0.5


def test_block_sparse_finds_the_hot_tile():
    q, k, v, ctx = planted_call(hot_tile=5)
    layout = BlockLayout(ctx, 32)
    sel = build_method("block_sparse", block_size=32, top_k=2).select(q, k, ctx, layout).mask
    assert sel[0, :, 6:, 5].all()
    assert int(sel.sum(-1).max()) <= 3


def vertical_line_call():
    """Every query strongly prefers key 300 (a vertical line); otherwise flat attention."""
    q, k, v, ctx = make_call(512, 512, batch=1, hq=2, hkv=1, d=16, seed=1)
    q, k = 0.05 * q, 0.05 * k
    q[..., 0] += 3.0
    k[0, :, 300, 0] += 6.0
    return q, k, v, ctx


@pytest.mark.parametrize("planted", ["hot_tile", "vertical_line"])
def test_flexprefill_finds_planted_structure(planted):
    if planted == "hot_tile":
        q, k, v, ctx = planted_call(hot_tile=5)
        tile, rows = 5, slice(6, None)
    else:
        q, k, v, ctx = vertical_line_call()
        tile, rows = 300 // 32, slice(10, None)
    layout = BlockLayout(ctx, 32)
    sel = (
        build_method("flexprefill", gamma=0.6, min_budget=0, block_size=32)
        .select(q, k, ctx, layout)
        .mask
    )
    assert sel[0, :, rows, tile].all()
    assert sel[0].float().mean() < layout.visible.float().mean()


def test_flexprefill_min_budget_adds_tiles():
    q, k, v, ctx = planted_call(hot_tile=5)
    layout = BlockLayout(ctx, 32)
    lean = (
        build_method("flexprefill", gamma=0.3, min_budget=0, block_size=32)
        .select(q, k, ctx, layout)
        .mask
    )
    padded = (
        build_method("flexprefill", gamma=0.3, min_budget=256, block_size=32)
        .select(q, k, ctx, layout)
        .mask
    )
    assert (padded | ~lean).all() and padded.sum() > lean.sum()
    rows_with_room = layout.visible[0].sum(-1) >= 8
    assert (padded[0, :, rows_with_room].sum(-1) >= 8).all()  # 256 tokens = 8 tiles of 32

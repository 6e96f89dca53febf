"""One contract for every registered method: new methods are covered by being registered."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from test_backends import make_call

import sparseattn
from sparseattn.backends import BlockLayout, reference_attend
from sparseattn.registry import METHODS, build_method
from sparseattn.types import Phase

# every method that selects prefill tiles (decode selection has its contract in
# test_decode_methods.py)
ALL = [n for n in sparseattn.list_methods() if Phase.PREFILL in METHODS[n].phases]
PREFILL_CALLS = {
    "prefill": dict(q_len=256, kv_len=256),
    "chunk": dict(q_len=96, kv_len=300),
    "padded": dict(q_len=200, kv_len=200, pad=(0, 50)),
}


# methods that cannot run without a per-model profile get a hand-made one covering these calls
NEEDS = {
    "minference": {"profile": str(Path(__file__).parent / "data" / "minference-contract.json")},
    # random gate weights for layer 0 of the calls (4 query / 2 KV heads of 16, tiles of 32)
    "seer": {"gates": str(Path(__file__).parent / "data" / "seer-contract.safetensors")},
}


def select(name, call, **knobs):
    method = build_method(name, **{"block_size": 32, **NEEDS.get(name, {}), **knobs})
    q, k, v, ctx = make_call(**call, seed=7)
    layout = BlockLayout(ctx, method.block_size)
    return method, layout, method.select(q, k, ctx, layout), (q, k, v, ctx)


@pytest.mark.parametrize("call", PREFILL_CALLS, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_selection_shape_causal_diagonal_and_density(name, call):
    method, layout, sel, (q, k, v, ctx) = select(name, PREFILL_CALLS[call])
    assert sel.mask.shape == (ctx.batch, ctx.num_q_heads, layout.n_q_blocks, layout.n_kv_blocks)
    assert sel.block_size == method.block_size
    assert not (sel.mask & ~layout.visible[:, None]).any(), (
        "a tile with no visible pair was selected"
    )
    diag = layout.diagonal[None, None] & layout.visible[:, None]
    assert (sel.mask | ~diag).all(), "the diagonal tile must always be kept"
    computed, visible = layout.density(sel)
    density = computed / visible
    assert ((density > 0) & (density <= 1)).all()


@pytest.mark.parametrize("name", ALL)
def test_deterministic(name):
    _, _, first, _ = select(name, PREFILL_CALLS["prefill"])
    _, _, second, _ = select(name, PREFILL_CALLS["prefill"])
    assert torch.equal(first.mask, second.mask)


def _tile_budgeted() -> list[str]:
    """Methods that declare a tile budget; mass-threshold methods are checked by their own tests."""
    names = []
    for name in ALL:
        method, layout, _, _ = select(name, PREFILL_CALLS["prefill"])
        if method.max_tiles_per_row(layout) is not None:
            names.append(name)
    return names


@pytest.mark.parametrize("name", _tile_budgeted())
def test_budget_respected(name):
    method, layout, sel, _ = select(name, PREFILL_CALLS["prefill"])
    assert int(sel.mask.sum(-1).max()) <= method.max_tiles_per_row(layout)


@pytest.mark.parametrize("name", ALL)
def test_budget_limit_equals_dense(name):
    limit = METHODS[name].dense_limit
    method, layout, sel, (q, k, v, ctx) = select(name, PREFILL_CALLS["padded"], **limit)
    assert torch.equal(sel.mask, layout.visible[:, None].expand_as(sel.mask))
    rows = torch.ones_like(reference_attend(q, k, v, None, ctx), dtype=torch.bool)
    rows[1, :50] = False  # padded queries of row 1 see nothing
    torch.testing.assert_close(
        reference_attend(q, k, v, sel, ctx)[rows], reference_attend(q, k, v, None, ctx)[rows]
    )


def test_oracle_keeps_requested_mass():
    from sparseattn.methods.oracle import true_tile_mass

    method, layout, sel, (q, k, v, ctx) = select("oracle", PREFILL_CALLS["prefill"], top_p=0.8)
    mass = true_tile_mass(q, k, ctx, layout)  # (B, H, nQ, nK)
    total = mass.sum(-1)
    kept = (mass * sel.mask).sum(-1) / total
    assert (kept >= 0.8 - 1e-5).all()
    # minimal: per row, exactly the shortest prefix of tiles by decreasing mass that reaches
    # the target, plus the forced diagonal (recomputed here row by row)
    expected = torch.zeros_like(sel.mask)
    for b, h, i in itertools.product(*map(range, mass.shape[:3])):
        row_total, running = float(mass[b, h, i].sum()), 0.0
        for j in mass[b, h, i].argsort(descending=True).tolist():
            if running >= 0.8 * row_total or mass[b, h, i, j] <= 0:
                break
            expected[b, h, i, j] = True
            running += float(mass[b, h, i, j])
    expected |= layout.diagonal[None, None] & layout.visible[:, None]
    assert torch.equal(sel.mask, expected)
    assert sel.mask.float().mean() < layout.visible.float().mean()


def test_strided_heads_cover_the_context_together():
    method, layout, sel, _ = select("strided", PREFILL_CALLS["prefill"], stride=4, sink=0, window=1)
    union = sel.mask[0].any(0)  # tiles any of the 4 heads reads
    assert torch.equal(union, layout.visible[0])
    assert not torch.equal(sel.mask[0, 0], sel.mask[0, 1])

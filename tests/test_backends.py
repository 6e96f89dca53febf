"""flex and gather backends equal the dense fp32 reference on random selections."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparseattn.backends import BlockLayout, flex_attend, gather_attend, reference_attend
from sparseattn.backends.masks import base_token_mask, expand_blocks
from sparseattn.types import AttentionContext, Phase


def make_call(
    q_len,
    kv_len,
    *,
    batch=2,
    hq=4,
    hkv=2,
    d=16,
    q_offset=None,
    window=None,
    pad=(0, 0),
    softcap=None,
    seed=0,
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, q_len, d, generator=g)
    k = torch.randn(batch, hkv, kv_len, d, generator=g)
    v = torch.randn(batch, hkv, kv_len, d, generator=g)
    key_valid = None
    if any(pad):
        key_valid = torch.ones(batch, kv_len, dtype=torch.bool)
        for row, n in enumerate(pad):
            key_valid[row, :n] = False
    q_offset = kv_len - q_len if q_offset is None else q_offset
    ctx = AttentionContext(
        layer_idx=0,
        phase=Phase.DECODE if q_len == 1 else Phase.PREFILL,
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        q_offset=q_offset,
        kv_offset=0,
        num_q_heads=hq,
        num_kv_heads=hkv,
        scaling=d**-0.5,
        sliding_window=window,
        softcap=softcap,
        key_valid=key_valid,
    )
    return q, k, v, ctx


def random_selection(ctx, block_size, density=0.4, seed=1):
    layout = BlockLayout(ctx, block_size)
    g = torch.Generator().manual_seed(seed)
    raw = (
        torch.rand(ctx.batch, ctx.num_q_heads, layout.n_q_blocks, layout.n_kv_blocks, generator=g)
        < density
    )
    return layout, layout.finalize(raw)


CASES = [
    dict(q_len=128, kv_len=128),  # aligned
    dict(q_len=200, kv_len=200),  # ragged
    dict(q_len=77, kv_len=301),  # chunked prefill with a prefix
    dict(q_len=1, kv_len=173),  # decode
    dict(q_len=150, kv_len=150, window=40),  # model sliding window
    dict(q_len=150, kv_len=150, pad=(0, 37)),  # left padding
    dict(q_len=1, kv_len=90, pad=(13, 0)),  # decode with padding
    dict(q_len=96, kv_len=96, softcap=5.0),  # Gemma 2 style soft-capping
]


def valid_rows(ctx):
    """(B, 1, Lq, 1) True for queries that see at least one key (padded queries are garbage)."""
    return base_token_mask(ctx).any(-1, keepdim=True).transpose(1, 2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("block_size", [16, 32])
def test_flex_equals_reference(case, block_size):
    q, k, v, ctx = make_call(**case)
    layout, sel = random_selection(ctx, block_size)
    expected = reference_attend(q, k, v, sel, ctx)
    got = flex_attend(q, k, v, sel, ctx, layout)
    rows = valid_rows(ctx).expand_as(got)
    torch.testing.assert_close(got[rows], expected[rows], atol=2e-5, rtol=1e-4)


def test_flex_leaves_the_global_dynamo_limit_alone():
    """A library must not change process-wide settings: compiling and running flex (in a fresh
    process, so it really compiles) leaves dynamo's global recompile limit as it was."""
    code = textwrap.dedent(
        """
        import torch._dynamo
        from test_backends import make_call, random_selection
        from sparseattn.backends import flex_attend

        before = torch._dynamo.config.cache_size_limit
        q, k, v, ctx = make_call(64, 64)
        flex_attend(q, k, v, random_selection(ctx, 32)[1], ctx)
        after = torch._dynamo.config.cache_size_limit
        assert after == before, f"cache_size_limit {before} -> {after}"
        """
    )
    env = {**os.environ, "SPARSEATTN_FLEX_COMPILE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("batches", [(1, 3), (3, 1)], ids=str)
def test_flex_survives_batch_size_changes(batches):
    """A batch-1 call followed by a larger batch (and back) must not break the compiled kernel."""
    for batch in batches:
        q, k, v, ctx = make_call(160, 160, batch=batch, hq=6, hkv=3, d=8, seed=batch)
        layout, sel = random_selection(ctx, 32)
        torch.testing.assert_close(
            flex_attend(q, k, v, sel, ctx, layout),
            reference_attend(q, k, v, sel, ctx),
            atol=2e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("case", [c for c in CASES if c["q_len"] == 1], ids=str)
def test_gather_equals_reference_for_decode(case):
    q, k, v, ctx = make_call(**case)
    _, sel = random_selection(ctx, 16)
    torch.testing.assert_close(
        gather_attend(q, k, v, sel, ctx), reference_attend(q, k, v, sel, ctx), atol=2e-5, rtol=1e-4
    )


def test_reference_full_selection_equals_sdpa():
    q, k, v, ctx = make_call(100, 100)
    layout = BlockLayout(ctx, 32)
    sel = layout.finalize(torch.ones(2, 4, layout.n_q_blocks, layout.n_kv_blocks, dtype=torch.bool))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(reference_attend(q, k, v, sel, ctx), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES[:6], ids=str)
def test_layout_counts_match_token_mask(case):
    _, _, _, ctx = make_call(**case)
    layout = BlockLayout(ctx, 32)
    full = torch.ones(ctx.batch, 1, layout.n_q_blocks, layout.n_kv_blocks, dtype=torch.bool)
    tokens = base_token_mask(ctx) & expand_blocks(full, 32, ctx.q_len, ctx.kv_len)
    per_tile = torch.nn.functional.pad(
        tokens[:, 0].float(),
        (0, layout.n_kv_blocks * 32 - ctx.kv_len, 0, layout.n_q_blocks * 32 - ctx.q_len),
    )
    per_tile = per_tile.view(ctx.batch, layout.n_q_blocks, 32, layout.n_kv_blocks, 32).sum((2, 4))
    assert torch.equal(layout.counts.float(), per_tile)


def test_measured_density_counts_only_computed_visible_pairs():
    q, k, v, ctx = make_call(64, 64, batch=1, hq=2, hkv=1)
    layout = BlockLayout(ctx, 32)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 1, 0] = True  # head 1 also keeps the off-diagonal tile
    computed, visible = layout.density(layout.finalize(mask))
    # causal 64x64: 2080 visible pairs; the diagonal tiles hold 528 each, the off-diagonal 1024
    assert visible[0, 0].item() == 2080
    assert computed[0].tolist() == [1056.0, 2080.0]

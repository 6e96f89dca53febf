"""flex and gather backends equal the dense fp32 reference on random selections."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparseattn.backends import (
    BlockLayout,
    dense_decode,
    flex_attend,
    gather_attend,
    reference_attend,
)
from sparseattn.backends.masks import base_token_mask, expand_blocks
from sparseattn.types import (
    EMPTY_POSITION,
    AttentionContext,
    PageSelection,
    Phase,
    TokenSelection,
)


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


DECODE_CASES = [
    dict(q_len=1, kv_len=173),  # decode
    dict(q_len=1, kv_len=90, pad=(13, 0)),  # decode with padding
    dict(q_len=1, kv_len=90, window=40),  # the layer's own window
    dict(q_len=1, kv_len=64, softcap=5.0),  # soft-capping
]


def random_pages(ctx, page_size, rows, n, seed=2):
    g = torch.Generator().manual_seed(seed)
    n_pages = -(-ctx.kv_len // page_size)
    pages = torch.randint(0, n_pages, (ctx.batch, rows, n), generator=g)
    valid = torch.rand(ctx.batch, rows, n, generator=g) < 0.8
    valid[..., 0] = True
    pages[..., 0] = n_pages - 1  # the current page, as every decode method keeps it
    return PageSelection(pages=pages, valid=valid, page_size=page_size)


def distinct(selection):
    """Drop repeated pages within a row (a page read twice would count its keys twice)."""
    pages, valid = selection.pages, selection.valid.clone()
    for b in range(pages.shape[0]):
        for h in range(pages.shape[1]):
            seen = set()
            for i, p in enumerate(pages[b, h].tolist()):
                if p in seen:
                    valid[b, h, i] = False
                seen.add(p)
    return PageSelection(pages=pages, valid=valid, page_size=selection.page_size)


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("per", ["kv_head", "query_head"])
def test_gather_pages_equals_reference(case, per):
    q, k, v, ctx = make_call(**case)
    rows = ctx.num_kv_heads if per == "kv_head" else ctx.num_q_heads
    sel = distinct(random_pages(ctx, 16, rows, 4))
    paged = -(-ctx.kv_len // 16) * 16  # keys over whole pages, stale slots past kv_len
    k_paged = torch.nn.functional.pad(k, (0, 0, 0, paged - ctx.kv_len), value=7.0)
    v_paged = torch.nn.functional.pad(v, (0, 0, 0, paged - ctx.kv_len), value=7.0)
    torch.testing.assert_close(
        gather_attend(q, k_paged, v_paged, sel, ctx),
        reference_attend(q, k, v, sel, ctx),
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_gather_tokens_equals_reference(case):
    q, k, v, ctx = make_call(**case)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(ctx.batch, ctx.num_q_heads, ctx.kv_len, generator=g)
    scores[..., -1] = 2.0  # the current token is always kept
    indices = scores.topk(20, dim=-1).indices  # distinct slots
    valid = torch.rand(indices.shape, generator=g) < 0.7
    valid[..., 0] = True
    sel = TokenSelection(indices=indices, valid=valid)
    torch.testing.assert_close(
        gather_attend(q, k, v, sel, ctx), reference_attend(q, k, v, sel, ctx), atol=2e-5, rtol=1e-4
    )


def evicted_call(per_head: bool, seed=4):
    """A decode call over a cache that kept scattered positions (and empty slots) per row/head."""
    q, k, v, ctx = make_call(1, 48, seed=seed)
    g = torch.Generator().manual_seed(seed)
    heads = ctx.num_kv_heads if per_head else 1
    positions = torch.stack(
        [torch.randperm(300, generator=g)[:48] for _ in range(ctx.batch * heads)]
    ).view(ctx.batch, heads, 48)
    positions[..., -1] = 300  # the current token
    positions[..., 5] = EMPTY_POSITION  # an empty slot
    ctx = dataclasses.replace(ctx, q_offset=300, kv_offset=0, key_positions=positions)
    return q, k, v, ctx


@pytest.mark.parametrize("per_head", [False, True])
def test_decode_over_explicit_positions_equals_reference(per_head):
    q, k, v, ctx = evicted_call(per_head)
    expected = reference_attend(q, k, v, None, ctx)
    torch.testing.assert_close(
        dense_decode(q, k, v, ctx, all_visible=False), expected, atol=2e-5, rtol=1e-4
    )
    sel = distinct(random_pages(ctx, 8, ctx.num_kv_heads, 3))
    paged = torch.nn.functional.pad(k, (0, 0, 0, 0))
    torch.testing.assert_close(
        gather_attend(q, paged, v, sel, ctx),
        reference_attend(q, k, v, sel, ctx),
        atol=2e-5,
        rtol=1e-4,
    )
    # the empty slot is never attended: changing its key and value changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 5], v2[:, :, 5] = 100.0, 100.0
    torch.testing.assert_close(
        dense_decode(q, k2, v2, ctx, all_visible=False), expected, atol=2e-5, rtol=1e-4
    )


def test_reference_equals_sdpa_over_explicit_positions():
    """The oracle itself: over explicit positions it equals SDPA with the hand-built mask."""
    q, k, v, ctx = evicted_call(per_head=True)
    positions = ctx.key_positions  # (B, Hkv, Lk)
    mask = (positions <= ctx.q_offset).repeat_interleave(ctx.groups, 1)[:, :, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q,
        k.repeat_interleave(ctx.groups, 1),
        v.repeat_interleave(ctx.groups, 1),
        attn_mask=mask,
        scale=ctx.scaling,
    ).transpose(1, 2)
    torch.testing.assert_close(reference_attend(q, k, v, None, ctx), expected, atol=1e-5, rtol=1e-4)


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

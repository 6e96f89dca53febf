"""PBS-Attn, AnchorAttention and HiP: planted structure is found, the dense limit equals dense
through the hook, and PBS's permuted run computes each visible pair once, exactly."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import left_padded_batch, make_model
from test_backends import make_call
from transformers import DynamicCache

import sparseattn
from sparseattn.backends import BlockLayout, reference_attend
from sparseattn.backends.masks import base_token_mask, expand_blocks
from sparseattn.backends.tiles import attend_tiles
from sparseattn.methods.common import row_sink_tiles
from sparseattn.methods.pbs import segment_key_order
from sparseattn.registry import METHODS, build_method

torch.set_grad_enabled(False)

CALLS = {
    "padded": {"q_len": 200, "kv_len": 200, "pad": (0, 50)},
    "chunk": {"q_len": 96, "kv_len": 300},
}
PBS = {"segment": 64, "block_size": 16}


def attended_rows(ctx) -> torch.Tensor:
    """(B, Lq) the queries that see at least one key (padded queries of row 1 see none)."""
    return base_token_mask(ctx).any(-1)[:, 0]


def masked_attention(q, k, v, ctx, mask):
    """Dense fp32 attention over an explicit (B, Hq, Lq, Lk) pair mask: the oracle."""
    k = k.float().repeat_interleave(ctx.groups, 1)
    v = v.float().repeat_interleave(ctx.groups, 1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * ctx.scaling
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.matmul(probs, v).transpose(1, 2)  # (B, Lq, Hq, D)


def pairs_of_run(run, order, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hq, Lq, Lk) pairs the permuted run reads from its permuted copy and from the original
    keys, both in the original key order."""
    Lk, b = ctx.kv_len, run.layout.block_size
    tokens = expand_blocks(run.selection.mask, b, ctx.q_len, run.ctx.kv_len)
    tokens = tokens & base_token_mask(run.ctx)  # what the kernel computes
    copy = (-(-Lk // b)) * b  # the permuted copy, padded to whole tiles
    slots = tokens[..., :Lk]  # slot j holds key order[..., j]
    inverse = order.argsort(-1).repeat_interleave(ctx.groups, 1)  # (B, Hq, Lk)
    permuted = slots.gather(-1, inverse[:, :, None].expand_as(slots))
    return permuted, tokens[..., copy:]


@pytest.mark.parametrize("call", CALLS)
def test_pbs_orders_keys_by_importance_inside_full_segments(call):
    q, k, _v, ctx = make_call(**CALLS[call], seed=1)
    order = segment_key_order(q, k, ctx, 64, n_last=16)  # (B, Hkv, Lk)
    Lk, full = ctx.kv_len, ctx.kv_len // 64 * 64
    assert torch.equal(order.sort(-1).values, torch.arange(Lk).expand_as(order))
    slots = torch.arange(Lk)
    assert torch.equal(order[..., :full] // 64, (slots[:full] // 64).expand(*order.shape[:2], -1))
    assert torch.equal(order[..., full:], slots[full:].expand(*order.shape[:2], -1))
    # oracle: the last 16 queries' attention, averaged over them and the KV head's query heads
    scores = torch.matmul(q[:, :, -16:], k.repeat_interleave(2, 1).transpose(-1, -2))
    visible = base_token_mask(ctx, ctx.q_len - 16)
    probs = (scores * ctx.scaling).masked_fill(~visible, float("-inf")).softmax(-1)
    importance = probs.view(2, 2, 2, 16, Lk).mean((2, 3))  # (B, Hkv, Lk)
    if ctx.key_valid is not None:
        importance = importance.masked_fill(~ctx.key_valid[:, None], -1.0)
    ranked = importance.gather(-1, order)[..., :full].view(2, 2, -1, 64)
    assert (ranked[..., :-1] >= ranked[..., 1:]).all(), "each segment sorted by importance"
    if ctx.key_valid is not None:  # padding sorts last, in the same slots for every KV head
        slots_valid = ctx.key_valid[:, None].expand_as(order).gather(-1, order)
        assert torch.equal(slots_valid[:, 0], slots_valid[:, 1])


@pytest.mark.parametrize("backend", ["reference", "cpp", "flex"])
@pytest.mark.parametrize("call", CALLS)
def test_pbs_every_tile_equals_dense_and_counts_each_pair_once(call, backend):
    q, k, v, ctx = make_call(**CALLS[call], seed=2)
    layout = BlockLayout(ctx, 16)
    run = build_method("pbs", threshold=1.0, **PBS).rearrange(q, k, v, ctx, layout)
    assert run is not None and not torch.equal(run.k[:, :, : ctx.kv_len], k), "keys permuted"
    got = attend_tiles(backend, q, run.k, run.v, run.selection, run.ctx, run.layout)
    expected = reference_attend(q, k, v, None, ctx)
    rows = attended_rows(ctx)
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)
    computed, _ = run.layout.density(run.selection)
    visible = layout.counts.sum((-1, -2), dtype=torch.float64)[:, None].expand_as(computed)
    assert torch.equal(computed, visible)


@pytest.mark.parametrize("call", CALLS)
def test_pbs_sparse_run_equals_attention_over_its_pairs(call):
    q, k, v, ctx = make_call(**CALLS[call], seed=3)
    q = 3 * q  # peaky attention: the threshold leaves tiles out
    layout = BlockLayout(ctx, 16)
    method = build_method("pbs", threshold=0.6, **PBS)
    run = method.rearrange(q, k, v, ctx, layout)
    order = segment_key_order(q, k, ctx, 64, n_last=16)
    from_copy, from_keys = pairs_of_run(run, order, ctx)
    assert not (from_copy & from_keys).any(), "a pair is computed twice"
    pairs = from_copy | from_keys
    assert not (pairs & ~base_token_mask(ctx)).any(), "a future or padded key is read"
    assert pairs.sum() < base_token_mask(ctx).expand_as(pairs).sum(), "the run is sparse"
    got = attend_tiles("cpp", q, run.k, run.v, run.selection, run.ctx, run.layout)
    expected = masked_attention(q, k, v, ctx, pairs)
    rows = attended_rows(ctx)
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=1e-5)
    # select alone: original-order tiles holding every pair of the permuted run
    tiles = method.select(q, k, ctx, layout)
    assert not (pairs & ~expand_blocks(tiles.mask, 16, ctx.q_len, ctx.kv_len)).any()


def test_pbs_gathers_scattered_heavy_keys_into_one_tile():
    """Four keys every query likes lie in four tiles of the first segment: the permutation puts
    them in one tile, which every later query tile keeps alone from that segment, and PBS
    reaches a recall of the true attention the unpermuted selection needs more tiles for."""
    q, k, v, ctx = make_call(256, 256, batch=1, hq=2, hkv=1, d=16, seed=4)
    u = torch.zeros(16)
    u[0] = 1.0
    q, k = 0.1 * q + 4.0 * u, 0.1 * k
    hot = torch.tensor([3, 21, 38, 60])  # tiles 0, 1, 2, 3 of 16 keys
    k[:, :, hot] += 8.0 * u
    layout = BlockLayout(ctx, 16)
    order = segment_key_order(q, k, ctx, 64, n_last=16)
    assert set(order[0, 0, :4].tolist()) == set(hot.tolist())
    run = build_method("pbs", threshold=0.3, **PBS).rearrange(q, k, v, ctx, layout)
    permuted = run.selection.mask[0, :, 4:, :4]  # later query tiles x first segment's tiles
    assert permuted[..., 0].all() and not permuted[..., 1:].any()

    visible = base_token_mask(ctx)
    logits = torch.matmul(q, k.repeat_interleave(2, 1).transpose(-1, -2)) * ctx.scaling
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # the true attention
    pbs_recall = float((probs * torch.logical_or(*pairs_of_run(run, order, ctx))).sum() / 512)
    pbs_tiles = int(run.selection.mask.sum())
    assert pbs_recall > 0.99
    plain_tiles = []  # tiles the unpermuted selection needs for at least that recall
    for threshold in (0.3, 0.5, 0.7, 0.9, 0.99):
        plain = build_method("pbs", threshold=threshold, permute=False, **PBS)
        tiles = plain.select(q, k, ctx, layout).mask
        pairs = expand_blocks(tiles, 16, 256, 256) & visible
        if float((probs * pairs).sum() / 512) >= pbs_recall:
            plain_tiles.append(int(tiles.sum()))
    assert plain_tiles and min(plain_tiles) > 2 * pbs_tiles


def vertical_line_call(sink: float = 6.0):
    """Row 0: every query likes key 300 (a vertical line); both rows: every query likes the
    first key (the attention sink), the rest is near-flat noise."""
    q, k, v, ctx = make_call(512, 512, batch=2, hq=2, hkv=1, d=16, seed=1)
    q, k = 0.05 * q, 0.05 * k
    q[..., 0] += 3.0
    k[:, :, 0, 0] += sink
    k[0, :, 300, 0] += 6.0
    return q, k, v, ctx


@pytest.mark.parametrize("step", [1, 16])
def test_anchor_keeps_the_stripe_near_the_anchor(step):
    q, k, _v, ctx = vertical_line_call()
    layout = BlockLayout(ctx, 32)
    sel = build_method("anchor", theta=2.0, step=step, block_size=32).select(q, k, ctx, layout)
    mask = sel.mask
    assert mask[0, :, 10:, 300 // 32].all(), "the line's tile is kept for every later query tile"
    assert not mask[1, :, 10:, 300 // 32].any(), "row 1 has no line"
    assert int(mask.sum(-1).max()) <= 4  # sink tile, line tile, diagonal (1 or 2)


def anchor_oracle(q, k, ctx, b: int, theta: float) -> torch.Tensor:
    """AnchorAttention's rule with step 1, computed query tile by query tile."""
    B, Hq, Lq, _ = q.shape
    nQ, nK = -(-Lq // b), -(-ctx.kv_len // b)
    visible = base_token_mask(ctx)[:, 0]  # (B, Lq, Lk)
    keys = k.repeat_interleave(ctx.groups, 1)
    logits = torch.matmul(q, keys.transpose(-1, -2)) * ctx.scaling  # (B, Hq, Lq, Lk)
    mask = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool)
    for row in range(B):
        first = int(ctx.key_valid[row].float().argmax()) if ctx.key_valid is not None else 0
        sink = torch.zeros(ctx.kv_len, dtype=torch.bool)
        sink[first : first + b] = True
        for i in range(nQ):
            queries = range(i * b, min((i + 1) * b, Lq))
            own = {(ctx.q_offset + r - ctx.kv_offset) // b for r in (queries[0], queries[-1])}
            local = torch.zeros(ctx.kv_len, dtype=torch.bool)
            for t in own:
                local[t * b : (t + 1) * b] = True
            rows = [r for r in queries if visible[row, r].any()]
            if not rows:
                continue
            seen = visible[row, rows] & (sink | local)  # (n, Lk)
            anchors = logits[row, :, rows].masked_fill(~seen, float("-inf")).amax(-1)
            mean_q = q[row, :, rows].mean(1)  # (Hq, D)
            score = (mean_q[:, None] * keys[row]).sum(-1) * ctx.scaling  # (Hq, Lk)
            keep = (score >= anchors.mean(-1, keepdim=True) - theta) & visible[row, rows].any(0)
            keep = torch.nn.functional.pad(keep, (0, nK * b - ctx.kv_len))
            mask[row, :, i] = keep.view(Hq, nK, b).any(-1)
        first_tiles = sink.nonzero()[:, 0] // b
        mask[row, :, :, first_tiles.unique()] = True
    return mask


@pytest.mark.parametrize("call", CALLS)
def test_anchor_matches_its_rule_computed_tile_by_tile(call):
    q, k, _v, ctx = make_call(**CALLS[call], seed=5)
    layout = BlockLayout(ctx, 32)
    sel = build_method("anchor", theta=0.5, step=1, block_size=32).select(q, k, ctx, layout)
    expected = layout.finalize(anchor_oracle(q, k, ctx, 32, 0.5)).mask
    assert torch.equal(sel.mask, expected)
    assert sel.mask.sum() < layout.visible[:, None].expand_as(sel.mask).sum()


def hot_band_call():
    """Row 0: queries share a direction u and the keys of tiles 4 to 7 point along it (a band:
    the attention locality HiP's middle-key scores rely on); row 1 is near-flat."""
    q, k, _v, ctx = make_call(512, 512, batch=2, hq=4, hkv=2, d=16, seed=0)
    u = torch.zeros(16)
    u[0] = 1.0
    q, k = 0.1 * q + 4.0 * u, 0.1 * k
    k[0, :, 4 * 32 : 8 * 32] += 4.0 * u
    return q, k, ctx


def test_hip_search_lands_in_the_hot_band_within_budget():
    q, k, ctx = hot_band_call()
    layout = BlockLayout(ctx, 32)
    method = build_method("hip", budget=64, block_size=32)  # two tiles searched
    sel = method.select(q, k, ctx, layout).mask
    assert (sel[0, :, 9:, 4:8].sum(-1) == 2).all(), "both searched tiles fall in the band"
    assert not torch.equal(sel[0], sel[1])
    assert int(sel.sum(-1).max()) <= method.max_tiles_per_row(layout)
    past = layout.visible & ~layout.diagonal  # tiles the search covers (the sink among them)
    rows = past.sum(-1) >= 4  # rows with more past tiles than the search keeps
    searched = (sel & past[:, None]).sum(-1)  # the two found, plus the sink when not found
    assert ((searched >= 2) & (searched <= 3))[rows[:, None].expand_as(searched)].all()


def hip_oracle(q, k, ctx, b: int, n: int) -> torch.Tensor:
    """HiP's search for one (row, head, query tile) at a time, with scores from full logits."""
    B, Hq, Lq, _ = q.shape
    nQ, nK = -(-Lq // b), -(-ctx.kv_len // b)
    visible = base_token_mask(ctx)[:, 0]  # (B, Lq, Lk)
    logits = torch.matmul(q, k.repeat_interleave(ctx.groups, 1).transpose(-1, -2))
    mask = torch.zeros(B, Hq, nQ, nK, dtype=torch.bool)
    for row, head, i in itertools.product(range(B), range(Hq), range(nQ)):
        queries = slice(i * b, min((i + 1) * b, Lq))
        own = (ctx.q_offset + i * b - ctx.kv_offset) // b  # first tile of its own positions
        past = [t for t in range(own) if visible[row, queries, t * b : (t + 1) * b].any()]
        if not past:
            continue
        lo, hi = past[0], past[-1] + 1
        first_real = int(visible[row].any(0).float().argmax())

        def score(a: int, c: int, row=row, head=head, queries=queries, first_real=first_real):
            begin, end = max(a * b, first_real), min(c * b, ctx.kv_len)
            if end <= begin:
                return float("-inf")
            middle = (begin + end - 1) // 2
            seen = visible[row, queries, middle]
            if not seen.any():
                return float("-inf")
            return float(logits[row, head, queries, middle][seen].max())

        nodes = [(lo + (hi - lo) * m // n, lo + (hi - lo) * (m + 1) // n) for m in range(n)]
        while any(c - a > 1 for a, c in nodes):
            halves = [(a, a + (c - a + 1) // 2) for a, c in nodes]
            halves += [(a + (c - a + 1) // 2, c) for a, c in nodes]
            ranked = sorted(halves, key=lambda h: score(*h), reverse=True)
            nodes = ranked[:n]
        for a, c in nodes:
            if c - a == 1:
                mask[row, head, i, a] = True
    return mask


@pytest.mark.parametrize("call", CALLS)
def test_hip_matches_its_search_computed_node_by_node(call):
    q, k, _v, ctx = make_call(**CALLS[call], seed=7)
    layout = BlockLayout(ctx, 16)
    sel = build_method("hip", budget=64, block_size=16).select(q, k, ctx, layout).mask
    expected = hip_oracle(q, k, ctx, 16, 4) | row_sink_tiles(layout, 1)[:, None]
    assert torch.equal(sel, layout.finalize(expected).mask)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", ["pbs", "anchor", "hip"])
def test_dense_limit_through_the_reference_backend_equals_dense(name, family):
    """The knobs at the dense limit give the model's own logits (left padding, GQA; qwen2 adds
    a sliding-window layer); pbs runs its permuted keys (segments of 64 before 150 tokens)."""
    model = make_model(family)
    ids, mask = left_padded_batch([150, 97], seed=4)
    expected = model(input_ids=ids, attention_mask=mask).logits
    knobs = {**METHODS[name].dense_limit, "block_size": 16}
    if name == "pbs":
        knobs["segment"] = 64
    with sparseattn.sparse_attention(
        model, name, min_length=0, prefill_backend="reference", **knobs
    ) as stats:
        got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=1e-4)
    assert stats.density("prefill") == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["pbs", "anchor", "hip"])
def test_dense_limit_in_chunked_prefill_equals_dense(name):
    """A prompt read in two chunks (the second at offset 90 over 150 keys) gives the model's
    own logits at the dense limit, on the C++ kernel."""
    model = make_model("llama")
    ids, mask = left_padded_batch([150, 97], seed=5)
    expected = model(input_ids=ids, attention_mask=mask).logits
    knobs = {**METHODS[name].dense_limit, "block_size": 16}
    if name == "pbs":
        knobs["segment"] = 64
    with sparseattn.sparse_attention(model, name, min_length=0, prefill_backend="cpp", **knobs):
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids[:, :90], attention_mask=mask[:, :90], past_key_values=cache)
        second = model(
            input_ids=ids[:, 90:], attention_mask=mask, past_key_values=cache, use_cache=True
        )
    got = torch.cat([first.logits, second.logits], 1)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=1e-4)


def test_pbs_through_the_hook_kernels_agree_and_density_counts_the_permuted_run():
    model = make_model("llama")
    ids, mask = left_padded_batch([150, 97], seed=6)
    knobs = dict(threshold=0.5, min_length=0, **PBS)
    with sparseattn.sparse_attention(model, "pbs", prefill_backend="reference", **knobs) as stats:
        expected = model(input_ids=ids, attention_mask=mask).logits
    for backend in ("cpp", "flex"):
        with sparseattn.sparse_attention(model, "pbs", prefill_backend=backend, **knobs):
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)
    assert 0.0 < stats.density("prefill") < 1.0

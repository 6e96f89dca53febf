"""Token-level decode selection: TokenSelect (soft vote, selection cache) and the decode oracle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import covering_budget, left_padded_batch, make_model
from syncs import decode_steps
from test_cache import generate
from test_decode_methods import decode_call

import sparseattn
from sparseattn.methods.decode.oracle import DecodeOracle
from sparseattn.methods.decode.tokenselect import TokenSelect
from sparseattn.types import DecodeView

torch.set_grad_enabled(False)

OFF = {"reuse_threshold": 2.0}  # the selection cache off


def exact_scores(q, k, ctx):
    """(B, Hq, Lk) q.k with K repeated per query head: the independent form of the scores."""
    keys = k.repeat_interleave(ctx.groups, dim=1)
    return torch.einsum("bhd,bhld->bhl", q[:, :, 0], keys)


def chosen(selection, row, head):
    return set(selection.indices[row, head][selection.valid[row, head]].tolist())


def test_oracle_reads_the_true_top_k_of_every_query_head():
    q, k, _, ctx = decode_call(kv_len=300, hq=4, hkv=2)
    selection = DecodeOracle(budget=20).select_decode(q, DecodeView(k), ctx)
    top = exact_scores(q, k, ctx).topk(20, dim=-1).indices
    assert selection.indices.shape == (2, 4, 20)
    for b in range(2):
        for h in range(4):
            assert chosen(selection, b, h) == set(top[b, h].tolist())


def test_tokenselect_reads_the_soft_vote_top_k_plus_forced_tokens():
    q, k, _, ctx = decode_call(kv_len=300, hq=4, hkv=2, seed=1)
    method = TokenSelect(budget=40, sink=4, window=8, **OFF)
    selection = method.select_decode(q, DecodeView(k), ctx)
    probs = (exact_scores(q, k, ctx) * ctx.scaling).softmax(-1)  # (B, Hq, Lk)
    vote = probs.view(2, 2, 2, 300).sum(2)  # each KV head: the sum of its query heads' softmax
    forced = set(range(4)) | set(range(300 - 8, 300))
    for b in range(2):
        for h in range(2):
            rest = [j for j in vote[b, h].argsort(descending=True).tolist() if j not in forced]
            assert chosen(selection, b, h) == forced | set(rest[: 40 - len(forced)])


def test_tokenselect_selects_a_planted_key():
    q, k, _, ctx = decode_call(kv_len=512, seed=3)
    target = 201
    k[:, 1, target] = 8.0 * q[:, 2, 0] / q[:, 2, 0].norm(dim=-1, keepdim=True)  # head 2's KV head
    selection = TokenSelect(budget=16, **OFF).select_decode(q, DecodeView(k), ctx)
    assert all(target in chosen(selection, b, 1) for b in range(2))


def test_tokenselect_selection_cache_reuses_per_row():
    """A row whose query stays close reuses its selection plus the appended token; a row whose
    query turned away chooses afresh, exactly as a cold selection would."""
    q, k, _, ctx = decode_call(kv_len=301, seed=4)
    method = TokenSelect(budget=32, reuse_threshold=0.9, max_reuse=8)
    state: dict = {}
    short = DecodeView(k[:, :, :300], state, writes=1, last_write=(0, 300))
    first = method.select_decode(q, short, dataclasses.replace(ctx, kv_len=300, q_offset=299))
    q2 = q.clone()
    q2[1] = -q[1]  # row 1 turns away, row 0 stays
    counters: dict = {}
    view = DecodeView(k, state, writes=2, last_write=(300, 301), counters=counters)
    second = method.select_decode(q2, view, ctx)
    for h in range(2):
        assert chosen(second, 0, h) == chosen(first, 0, h) | {300}
    cold = TokenSelect(budget=32, **OFF).select_decode(q2, DecodeView(k), ctx)
    for h in range(2):
        assert chosen(second, 1, h) == chosen(cold, 1, h)
    assert float(counters["tokenselect_hits"]) == 1 and counters["tokenselect_lookups"] == 2


@pytest.mark.parametrize(
    "name", ["tokenselect", "decode_oracle"]
)
@pytest.mark.parametrize("lengths", [[70, 51], [70, 70]], ids=["padded", "unpadded"])
def test_full_budget_equals_dense_generate(name, lengths, selection_over_every_key):
    """A selection of every key (gathered with a mask over padded keys, in place unpadded)
    decodes exactly as dense."""
    model = make_model("qwen2")  # layer 1 is a sliding ring of 24 slots
    ids, mask = left_padded_batch(lengths, seed=4)
    expected = generate(model, ids, mask)
    knobs = {"budget": covering_budget(ids, steps=8)}
    with sparseattn.sparse_attention(model, decode=name, decode_knobs=knobs, min_length=0):
        got = generate(model, ids, mask)
    stats = sparseattn.last_stats(model)
    assert stats.layer_methods("decode") == {0: name, 1: name}
    assert stats.density("decode") == 1.0  # every visible key read
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    "knobs", [OFF, {"reuse_threshold": 0.0, "max_reuse": 8}], ids=["fresh", "cached"]
)
def test_tokenselect_rows_are_independent_and_calls_start_clean(knobs):
    model = make_model("llama")
    ids, mask = left_padded_batch([80, 80], seed=5)
    knobs = {"budget": 24, "window": 4, **knobs}
    with sparseattn.sparse_attention(model, decode="tokenselect", decode_knobs=knobs, min_length=0):
        both = generate(model, ids, mask, steps=10)
        alone = [generate(model, ids[i : i + 1], mask[i : i + 1], steps=10) for i in range(2)]
        again = generate(model, ids, mask, steps=10)
    for row in range(2):
        assert torch.equal(both.sequences[row], alone[row].sequences[0])
    assert torch.equal(both.sequences, again.sequences)


def tokenselect_host_reads(model, knobs, steps=4):
    ids, mask = left_padded_batch([120, 97], seed=6)
    with sparseattn.sparse_attention(model, decode="tokenselect", decode_knobs=knobs, min_length=0):
        run = decode_steps(model, ids, mask, steps)
    return run.count, sparseattn.last_stats(model)


def test_tokenselect_host_reads():
    """No host read without the selection cache; with it, exactly one per layer and step after
    the first selection, and the hit counters add up."""
    model = make_model("llama")
    layers = model.config.num_hidden_layers
    reads, stats = tokenselect_host_reads(model, {"budget": 48, **OFF})
    assert reads == 0
    assert 0 < stats.density("decode") < 0.6
    reads, stats = tokenselect_host_reads(
        model, {"budget": 48, "reuse_threshold": -1.0, "max_reuse": 2}
    )
    assert reads == layers * 3  # step 1 selects; steps 2-4 look up
    assert stats.counter("tokenselect_lookups") == 2 * layers * 3
    assert stats.counter("tokenselect_hits") == 2 * layers * 2  # the third lookup hits max_reuse


def test_tokenselect_bad_budget_names_the_knob():
    with pytest.raises(ValueError, match="budget=10 is below what is always read"):
        TokenSelect(budget=10, sink=4, window=8)
    with pytest.raises(ValueError, match="reuse_threshold"):
        TokenSelect(reuse_threshold=5.0)

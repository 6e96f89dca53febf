"""RetrievalAttention: faiss indexes over the cached keys, kept with the cache, and their recall."""

from __future__ import annotations

import sys

import faiss
import numpy as np
import pytest
import torch
from conftest import covering_budget, left_padded_batch, make_model
from syncs import decode_steps
from test_cache import generate
from test_decode_methods import decode_call

import sparseattn
from sparseattn.methods.decode.retrieval import RetrievalAttention
from sparseattn.types import EMPTY_POSITION, DecodeView

torch.set_grad_enabled(False)


def chosen(selection, row, head):
    return set(selection.indices[row, head][selection.valid[row, head]].tolist())


def exact_scores(q, k, ctx, per_query_head):
    """(B, Hs, Lk) q.k with K repeated per query head, or the group's mean query per KV head."""
    if per_query_head:
        return torch.einsum("bhd,bhld->bhl", q[:, :, 0], k.repeat_interleave(ctx.groups, dim=1))
    mean = q[:, :, 0].view(ctx.batch, ctx.num_kv_heads, ctx.groups, -1).mean(2)
    return torch.einsum("bhd,bhld->bhl", mean, k)


@pytest.mark.parametrize("per_query_head", [False, True], ids=["group-mean", "per-head"])
def test_flat_index_reads_the_exact_top_k_plus_forced_tokens(per_query_head):
    q, k, _, ctx = decode_call(kv_len=300, hq=4, hkv=2, seed=1)
    method = RetrievalAttention(
        budget=40, sink=4, window=8, index="flat", per_query_head=per_query_head
    )
    selection = method.select_decode(q, DecodeView(k), ctx)
    rows = 4 if per_query_head else 2
    assert selection.indices.shape == (2, rows, 40)
    scores = exact_scores(q, k, ctx, per_query_head)
    forced = set(range(4)) | set(range(300 - 8, 300))
    for b in range(2):
        for h in range(rows):
            rest = [j for j in scores[b, h].argsort(descending=True).tolist() if j not in forced]
            assert chosen(selection, b, h) == forced | set(rest[: 40 - len(forced)])


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("per_query_head", [False, True], ids=["group-mean", "per-head"])
def test_a_planted_key_is_retrieved(index, per_query_head):
    q, k, _, ctx = decode_call(kv_len=512, seed=3)
    target = 201
    k[:, 1, target] = 8.0 * q[:, 2, 0] / q[:, 2, 0].norm(dim=-1, keepdim=True)  # head 2's KV head
    method = RetrievalAttention(
        budget=16, sink=0, window=0, index=index, per_query_head=per_query_head
    )
    selection = method.select_decode(q, DecodeView(k), ctx)
    row = 2 if per_query_head else 1
    assert all(target in chosen(selection, b, row) for b in range(2))


def index_contents(index):
    """(ids, vectors) an IndexIDMap holds, in insertion order."""
    ids = faiss.vector_to_array(index.id_map)
    inner = faiss.downcast_index(index.index)
    return ids, inner.reconstruct_n(0, inner.ntotal)


class CheckedRetrieval(RetrievalAttention):
    """Checks after every decode step that each index holds exactly the held, unpadded keys of
    its (row, KV head) under their slot ids (a graph index's latest vector per id, besides at
    most ``state.stale`` superseded ones); a flat index also answers as a rebuilt one."""

    pad = (0, 0)  # left padding of each batch row
    steps = 0

    def select_decode(self, q, view, ctx):
        selection = super().select_decode(q, view, ctx)
        state = view.state[self.state_key]
        B, H, L, D = view.keys.shape
        assert state.writes == view.writes and state.size == L
        queries = torch.randn(4, D).numpy()
        for b in range(B):
            if ctx.key_positions is None:  # contiguous: the row's left padding holds no key
                held = np.arange(self.pad[b], L)
            else:
                held = np.flatnonzero(ctx.key_positions[b, 0] != EMPTY_POSITION)
            for h in range(H):
                index = state.indexes[b * H + h]
                ids, vectors = index_contents(index)
                latest = {slot: row for row, slot in enumerate(ids.tolist())}  # last one wins
                assert sorted(latest) == held.tolist()
                assert len(ids) - len(latest) <= state.stale <= L
                rows = [latest[slot] for slot in held.tolist()]
                np.testing.assert_array_equal(vectors[rows], view.keys[b, h, held].numpy())
                if self.index == "flat":
                    rebuilt = faiss.IndexIDMap(faiss.IndexFlatIP(D))
                    rebuilt.add_with_ids(view.keys[b, h, held].numpy(), held)
                    got, want = index.search(queries, 16), rebuilt.search(queries, 16)
                    np.testing.assert_array_equal(got[1], want[1])
                    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        self.steps += 1
        return selection


@pytest.mark.parametrize("index", ["flat", "hnsw"])
@pytest.mark.parametrize("evict", [None, {"sink": 8, "window": 16}], ids=["full", "ring"])
def test_incremental_index_equals_a_rebuild_at_every_step(index, evict):
    """A full cache appends one slot per step (the index is extended); a ring cache overwrites
    slots, wraps around and re-rotates its sinks (the index replaces those slots' vectors):
    after every step of every layer the kept index equals one built from the cache's keys."""
    model = make_model("llama")
    ids, mask = left_padded_batch([90, 70], seed=2)
    method = CheckedRetrieval(budget=16, sink=2, window=4, index=index)
    method.pad = (0, 20)
    kwargs = {"evict": "streaming", "evict_knobs": evict} if evict else {}
    with sparseattn.sparse_attention(model, decode=method, min_length=0, **kwargs):
        generate(model, ids, mask, steps=23)
    assert method.steps == 22 * model.config.num_hidden_layers


@pytest.mark.parametrize("lengths", [[70, 51], [70, 70]], ids=["padded", "unpadded"])
def test_full_budget_equals_dense_generate(lengths, selection_over_every_key):
    """Exact (flat) search for every key: a selection of every key decodes exactly as dense."""
    model = make_model("qwen2")  # layer 1 is a sliding ring of 24 slots
    ids, mask = left_padded_batch(lengths, seed=4)
    expected = generate(model, ids, mask)
    knobs = {"budget": covering_budget(ids, steps=8), "index": "flat"}
    with sparseattn.sparse_attention(
        model, decode="retrieval_attention", decode_knobs=knobs, min_length=0
    ):
        got = generate(model, ids, mask)
    stats = sparseattn.last_stats(model)
    layers = {0: "retrieval_attention", 1: "retrieval_attention"}
    assert stats.layer_methods("decode") == layers
    assert stats.density("decode") == 1.0  # every visible key read
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )


def test_rows_are_independent_and_calls_start_clean():
    """Flat (exact, deterministic) indexes: a batch of two decodes each row exactly as alone;
    a second generate builds new indexes from its own cache."""
    model = make_model("llama")
    ids, mask = left_padded_batch([80, 80], seed=5)
    knobs = {"budget": 24, "sink": 2, "window": 4, "index": "flat"}
    with sparseattn.sparse_attention(
        model, decode="retrieval_attention", decode_knobs=knobs, min_length=0
    ):
        both = generate(model, ids, mask, steps=10)
        alone = [generate(model, ids[i : i + 1], mask[i : i + 1], steps=10) for i in range(2)]
        again = generate(model, ids, mask, steps=10)
    for row in range(2):
        assert torch.equal(both.sequences[row], alone[row].sequences[0])
    assert torch.equal(both.sequences, again.sequences)
    key = RetrievalAttention(**knobs).state_key
    first = both.past_key_values.layers[0].state[key]
    assert again.past_key_values.layers[0].state[key].indexes[0] is not first.indexes[0]


@pytest.mark.parametrize("per_query_head", [False, True], ids=["group-mean", "per-head"])
def test_recall_counters_equal_a_hand_count(per_query_head):
    """A sparse HNSW graph misses some of the true top-k: the counters hold the retrieved share
    of each search row's exact top ``budget``, counted here with sets."""
    q, k, _, ctx = decode_call(kv_len=400, seed=1)
    method = RetrievalAttention(
        budget=16,
        sink=0,
        window=0,
        hnsw_m=4,
        ef_search=1,
        per_query_head=per_query_head,
        report_recall=True,
    )
    counters: dict = {}
    view = DecodeView(k, counters=counters)
    method.select_decode(q, view, ctx)
    found = method.search(method.search_queries(q, ctx), view, ctx)  # the kept indexes again
    scores = exact_scores(q, k, ctx, per_query_head)
    hits = total = 0
    for b in range(found.shape[0]):
        for h in range(found.shape[1]):
            true = set(scores[b, h].topk(16).indices.tolist())
            hits += len(true & set(found[b, h].tolist()))
            total += len(true)
    assert 0 < hits < total  # an approximate search, so the count means something
    assert float(counters["retrieval_recall_hits"]) == hits
    assert float(counters["retrieval_recall_total"]) == total


def test_decode_on_cpu_reads_no_tensor_value_and_extends_one_index():
    """On CPU faiss reads views: no scalar read per step; the indexes built on the first step
    are extended in place by later steps, and recall reaches last_stats."""
    model = make_model("llama")
    ids, mask = left_padded_batch([120, 97], seed=6)
    knobs = {"budget": 48, "sink": 4, "window": 8, "index": "flat", "report_recall": True}
    key, built = RetrievalAttention(**knobs).state_key, []

    def same_index(cache):
        built.append(cache.layers[0].state[key].indexes[0])
        assert built[-1] is built[0]

    with sparseattn.sparse_attention(
        model, decode="retrieval_attention", decode_knobs=knobs, min_length=0
    ):
        run = decode_steps(model, ids, mask, each_step=same_index)
    assert run.syncs == [[]] * 4
    built = built[0]
    assert built.ntotal == 120 + 4  # the prompt and the four decoded tokens
    stats = sparseattn.last_stats(model)
    assert 0 < stats.density("decode") < 0.6
    layers = model.config.num_hidden_layers
    assert stats.counter("retrieval_recall_total") == 4 * layers * 2 * 2 * 48  # steps, rows
    assert stats.counter("retrieval_recall_hits") == stats.counter("retrieval_recall_total")


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="budget=10 is below what is always read"):
        RetrievalAttention(budget=10, sink=4, window=8)
    with pytest.raises(ValueError, match="index='ivf' is not allowed"):
        RetrievalAttention(index="ivf")
    with pytest.raises(ValueError, match="hnsw_m=1 is out of range"):
        RetrievalAttention(hnsw_m=1)


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    with pytest.raises(ValueError, match="pip install faiss-cpu"):
        RetrievalAttention()

"""Decode selection methods: a contract for every registered one, and Quest's state life cycle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import covering_budget, left_padded_batch, make_model
from syncs import decode_steps
from test_cache import generate

import sparseattn
from sparseattn.backends import gather_attend, reference_attend
from sparseattn.backends.gather import selection_slots
from sparseattn.methods.decode.quest import Quest, page_bounds
from sparseattn.registry import METHODS, build_method
from sparseattn.types import AttentionContext, DecodeView, PageSelection, Phase, TokenSelection

torch.set_grad_enabled(False)

# a hand-made channels profile for decode_call's shapes (1 layer, 2 KV heads, D = 16)
CHANNELS = str(Path(__file__).parent / "data" / "channels-contract.json")

# knobs that make every decode method sparse on a 300-token cache
SPARSE = {
    "streaming": {"sink": 16, "window": 32, "block_size": 16},
    "strided": {"stride": 4, "sink": 16, "window": 32, "block_size": 16},
    "oracle": {"top_p": 0.5},
    "quest": {"budget": 64, "block_size": 16, "full_layers": 0},
    "tokenselect": {"budget": 64, "sink": 4, "window": 8},
    "decode_oracle": {"budget": 64},
    "tidaldecode": {"budget": 64, "sink": 4, "window": 8},
    "delta": {"budget": 64, "sink": 4, "window": 8},
    "retrieval_attention": {"budget": 64, "sink": 4, "window": 8},
    "double_sparsity": {"budget": 64, "sink": 4, "window": 8, "channels": 4, "profile": CHANNELS},
}
# the layer of the lone contract call where a method's role depends on the layer: cross-layer
# methods are dense below full_layers, so the call is a later layer that finds nothing shared
CONTRACT_LAYER = {"tidaldecode": 5, "delta": 5}


def decode_methods() -> list[str]:
    return sorted(n for n in sparseattn.list_methods() if Phase.DECODE in METHODS[n].phases)


def decode_call(kv_len=300, batch=2, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, d, generator=g)
    k = torch.randn(batch, hkv, kv_len, d, generator=g)
    v = torch.randn(batch, hkv, kv_len, d, generator=g)
    ctx = AttentionContext(
        layer_idx=0,
        phase=Phase.DECODE,
        batch=batch,
        q_len=1,
        kv_len=kv_len,
        q_offset=kv_len - 1,
        kv_offset=0,
        num_q_heads=hq,
        num_kv_heads=hkv,
        scaling=d**-0.5,
    )
    return q, k, v, ctx


def test_every_decode_method_is_covered():
    assert set(decode_methods()) - {"dense"} <= set(SPARSE)


@pytest.mark.parametrize("name", decode_methods())
def test_decode_contract(name):
    """Static shapes, the current token always read, budget respected, deterministic, the
    gather backend equals the reference, and the dense limit reads everything."""
    q, k, v, ctx = decode_call()
    ctx = dataclasses.replace(ctx, layer_idx=CONTRACT_LAYER.get(name, 0))
    method = build_method(name, **SPARSE.get(name, {}))
    selection = method.select_decode(q, DecodeView(k), ctx)
    if name == "dense":
        assert selection is None
        return
    assert isinstance(selection, PageSelection | TokenSelection)
    slots, valid = selection_slots(selection)
    assert slots.shape[:2] in ((ctx.batch, ctx.num_kv_heads), (ctx.batch, ctx.num_q_heads))
    current = ((slots == ctx.kv_len - 1) & valid).any(-1)
    if METHODS[name].is_speedup:  # the oracles read only the top mass, the current token or not
        assert current.all()
    chosen = (valid & (slots < ctx.kv_len)).sum(-1).float()
    assert (chosen < ctx.kv_len).all()  # sparse at these knobs
    again = method.select_decode(q, DecodeView(k), ctx)
    assert torch.equal(selection_slots(again)[0], slots)
    torch.testing.assert_close(
        gather_attend(q, k, v, selection, ctx),
        reference_attend(q, k, v, selection, ctx),
        atol=2e-5,
        rtol=1e-4,
    )
    limit = build_method(name, **{**SPARSE.get(name, {}), **METHODS[name].dense_limit})
    assert limit.select_decode(q, DecodeView(k), ctx) is None


def test_quest_budget_is_respected_and_counts_pages():
    q, k, v, ctx = decode_call(kv_len=512)
    selection = Quest(budget=128, block_size=16, full_layers=0).select_decode(q, DecodeView(k), ctx)
    slots, valid = selection_slots(selection)
    assert slots.shape == (2, 2, 128) and bool(valid.all())  # 128 tokens = 8 pages per KV head
    for row in slots.view(4, 128):
        pages = set((row // 16).tolist())
        assert len(pages) == 8 and 511 // 16 in pages  # distinct whole pages, the current one


def test_quest_selects_a_planted_key():
    """A key built to have the largest q.k of head 0 lands on a page Quest reads."""
    q, k, v, ctx = decode_call(kv_len=512, seed=3)
    target = 137
    k[:, 0, target] = 8.0 * q[:, 0, 0] / q[:, 0, 0].norm(dim=-1, keepdim=True)
    selection = Quest(budget=64, block_size=16, full_layers=0).select_decode(q, DecodeView(k), ctx)
    assert ((selection.pages[:, 0] == target // 16).any(-1)).all()


def test_quest_bounds_are_upper_bounds_of_every_key():
    q, k, _, ctx = decode_call(kv_len=333)
    low, high = page_bounds(k, 16)
    scores = torch.maximum(
        q.view(2, 2, 2, 1, 16) * low[:, :, None], q.view(2, 2, 2, 1, 16) * high[:, :, None]
    ).sum(-1)
    exact = torch.matmul(q.view(2, 2, 2, 16), k.transpose(-1, -2))  # (B, Hkv, g, Lk)
    exact = torch.nn.functional.pad(exact, (0, 21 * 16 - 333), value=float("-inf"))
    per_page = exact.view(2, 2, 2, 21, 16).amax(-1)
    assert (scores >= per_page - 1e-5).all()


@pytest.mark.parametrize(
    "evict,lengths",
    [
        (None, [90, 90]),
        (None, [90, 71]),
        ({"sink": 8, "window": 40}, [90, 90]),
        ({"sink": 8, "window": 40, "rerotate": True}, [90, 90]),
    ],
    ids=["full", "full-padded", "ring", "ring-rerotated"],
)
def test_quest_incremental_bounds_equal_a_rebuild(evict, lengths):
    """After N decode steps the page bounds kept with the cache equal bounds rebuilt from keys
    (a full cache appends, folding each key into its page in place; a bounded ring cache
    overwrites slots and, re-rotating, moves its sinks' rotation each step)."""
    model = make_model("llama")
    ids, mask = left_padded_batch(lengths, seed=2)
    quest = Quest(budget=32, block_size=16, full_layers=0)
    kwargs = {"evict": "streaming", "evict_knobs": evict} if evict else {}
    with sparseattn.sparse_attention(model, decode=quest, min_length=0, **kwargs):
        out = generate(model, ids, mask, steps=23)
    for layer in out.past_key_values.layers:
        state = layer.state[quest.state_key]
        low, high = page_bounds(layer.keys, 16)
        assert state.writes == layer.writes
        torch.testing.assert_close(state.low, low)
        torch.testing.assert_close(state.high, high)


@pytest.mark.parametrize("lengths", [[70, 51], [70, 70]], ids=["padded", "unpadded"])
def test_quest_at_full_budget_equals_dense_generate(lengths, selection_over_every_key):
    """Quest selecting every page of the cache (its masked gather over padded keys; unpadded,
    the pages plus the page being written as a tail) decodes exactly as dense."""
    model = make_model("qwen2")  # layer 1 is a sliding ring of 24 slots
    ids, mask = left_padded_batch(lengths, seed=4)
    expected = generate(model, ids, mask)
    budget = covering_budget(ids, steps=8, page=16)
    knobs = {"budget": budget, "block_size": 16, "full_layers": 0}
    with sparseattn.sparse_attention(model, decode="quest", decode_knobs=knobs, min_length=0):
        got = generate(model, ids, mask)
    stats = sparseattn.last_stats(model)
    assert stats.layer_methods("decode") == {0: "quest", 1: "quest"}
    assert stats.density("decode") == 1.0  # every visible key read
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )


def test_quest_state_never_crosses_batch_rows_or_calls():
    """Each row selects from its own keys: a batch of two prompts decodes each exactly as
    alone; a second generate starts from a fresh cache and state."""
    model = make_model("llama")
    ids, mask = left_padded_batch([80, 80], seed=5)
    knobs = {"budget": 32, "block_size": 16, "full_layers": 0}
    with sparseattn.sparse_attention(model, decode="quest", decode_knobs=knobs, min_length=0):
        both = generate(model, ids, mask, steps=10)
        alone = [generate(model, ids[i : i + 1], mask[i : i + 1], steps=10) for i in range(2)]
        again = generate(model, ids, mask, steps=10)
    for row in range(2):
        assert torch.equal(both.sequences[row], alone[row].sequences[0])
        torch.testing.assert_close(
            torch.stack(both.logits)[:, row],
            torch.stack(alone[row].logits)[:, 0],
            atol=1e-4,
            rtol=1e-4,
        )
    assert torch.equal(both.sequences, again.sequences)
    state = both.past_key_values.layers[0].state
    assert state and again.past_key_values.layers[0].state is not state


def test_quest_page_reads_without_a_mask_equal_the_reference_backend():
    """Unpadded contiguous keys: Quest reads its pages and the page being written as a tail
    with no mask (the fast gather path), which must equal dense fp32 attention over the same
    selection, with the density counted on the host: the pages read over the keys held."""
    model = make_model("llama")
    ids, mask = left_padded_batch([150, 150], seed=8)
    knobs = {"budget": 64, "block_size": 16, "full_layers": 0}
    runs = {}
    for backend in ("gather", "reference"):
        with sparseattn.sparse_attention(
            model, decode="quest", decode_knobs=knobs, min_length=0, decode_backend=backend
        ) as stats:
            runs[backend] = generate(model, ids, mask, steps=12)
        if backend == "gather":
            density, decode = stats.density("decode"), stats.decode[0]
    torch.testing.assert_close(
        torch.stack(runs["gather"].logits),
        torch.stack(runs["reference"].logits),
        atol=1e-4,
        rtol=1e-4,
    )
    layer = runs["gather"].past_key_values.layers[0]
    assert decode.computed is None  # counted on the host
    steps = [150 + i for i in range(1, 12)]  # keys held at each decode step
    reads = [3 * 16 + (n - 1) % 16 + 1 for n in steps]  # 3 pages + the page being written
    assert decode.host_computed == pytest.approx(2 * sum(reads))
    assert decode.host_visible == pytest.approx(2 * sum(steps))
    assert 0 < density < 0.5 and layer.state


@pytest.mark.parametrize(
    "name,knobs",
    [
        ("tokenselect", {"budget": 40, "sink": 4, "window": 8, "reuse_threshold": 2.0}),
        ("decode_oracle", {"budget": 40}),
    ],
)
def test_token_reads_without_a_mask_equal_the_reference_backend(name, knobs):
    """Token selections on an all-visible cache run as one-slot pages read in place (no mask,
    density counted on the host) and equal dense fp32 attention over the same tokens."""
    model = make_model("llama")
    ids, mask = left_padded_batch([150, 150], seed=9)
    runs = {}
    for backend in ("gather", "reference"):
        with sparseattn.sparse_attention(
            model, decode=name, decode_knobs=knobs, min_length=0, decode_backend=backend
        ) as stats:
            runs[backend] = generate(model, ids, mask, steps=8)
        if backend == "gather":
            decode = stats.decode[1]
    torch.testing.assert_close(
        torch.stack(runs["gather"].logits),
        torch.stack(runs["reference"].logits),
        atol=1e-4,
        rtol=1e-4,
    )
    if name == "tokenselect":  # one choice per KV head: read in place, counted on the host
        assert decode.computed is None and decode.host_computed == pytest.approx(2 * 40 * 7)
    else:  # one choice per query head: gathered per head, counted on the device
        assert decode.computed is not None


@pytest.mark.parametrize("lengths", [[120, 97], [120, 120]], ids=["padded", "unpadded"])
def test_quest_decode_has_no_host_sync(lengths):
    model = make_model("llama")
    ids, mask = left_padded_batch(lengths, seed=6)
    with sparseattn.sparse_attention(
        model, decode="quest", decode_knobs={"budget": 48, "full_layers": 0}, min_length=0
    ):
        run = decode_steps(model, ids, mask)
    assert run.syncs == [[]] * 4
    assert 0 < sparseattn.last_stats(model).density("decode") < 0.6


def test_quest_bad_budget_names_the_knob():
    with pytest.raises(ValueError, match="budget=24 is below what is always read"):
        Quest(budget=24, block_size=16, window=16)
    with pytest.raises(ValueError, match="block_size=12 is not allowed"):
        Quest(block_size=12)

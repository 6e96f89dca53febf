"""Double Sparsity: channel calibration, the label cache's life cycle, token selection."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import covering_budget, left_padded_batch, make_model, tiny_config
from syncs import decode_steps
from test_cache import generate
from test_decode_methods import CHANNELS, decode_call

import sparseattn
from sparseattn.bench.channels import channel_importance, channel_profile, mean_importance
from sparseattn.methods.decode.double_sparsity import DoubleSparsity, labels_of
from sparseattn.methods.decode.tokenselect import TokenSelect
from sparseattn.profiles import load_profile, save_profile
from sparseattn.types import AttentionContext, DecodeView, Phase

torch.set_grad_enabled(False)

RANKING = load_profile(CHANNELS, "channels").heads[0.0][0]  # (Hkv, D) of the contract profile


def calibrated(model, path, length=160, seed=0) -> str:
    """Write a channels profile of ``model`` calibrated on one random input; returns its path."""
    ids = torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    importance = mean_importance(model, [("random", ids)])
    calibration = {"lengths": [length], "seed": seed, "samples": 1}
    save_profile(
        path,
        **channel_profile(
            importance, model_id="tiny", config=model.config, calibration=calibration
        ),
    )
    return str(path)


@pytest.fixture(scope="module")
def llama_profile(tmp_path_factory):
    return calibrated(make_model("llama"), tmp_path_factory.mktemp("ds") / "llama-channels.json")


def chosen(selection, row, head):
    return set(selection.indices[row, head][selection.valid[row, head]].tolist())


# -- calibration -------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 5])
def test_channel_importance_is_the_mean_over_visible_pairs(window):
    """Oracle: an explicit loop over every (query head, query, visible key) triple."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, L, D = 1, 4, 2, 12, 8
    q, k = torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    ctx = AttentionContext(0, Phase.PREFILL, B, L, L, 0, 0, Hq, Hkv, D**-0.5, window)
    want = torch.zeros(Hkv, D)
    for kv in range(Hkv):
        terms = []
        for head in range(kv * 2, kv * 2 + 2):
            for t in range(L):
                for s in range(t + 1):
                    if window is None or t - s < window:
                        terms.append((q[0, head, t] * k[0, kv, s]).abs())
        want[kv] = torch.stack(terms).mean(0)
    torch.testing.assert_close(channel_importance(q, k, ctx), want)


def test_calibration_ranks_a_planted_outlier_channel_first(tmp_path):
    """Channel 7 of every head's q and k, scaled up in the projections, leads every ranking
    (the slowest RoPE pair of D = 16, so rotation barely moves it off channel 7)."""
    model = make_model("llama")
    plain = load_profile(calibrated(model, tmp_path / "plain.json"), "channels")
    D, channel = 16, 7
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight[channel::D] *= 20.0  # row h * D + 7 of every head h
    planted = load_profile(calibrated(model, tmp_path / "planted.json"), "channels")
    firsts = [row[0] for table in planted.heads[0.0] for row in table]
    assert firsts == [channel] * 4  # 2 layers x 2 KV heads
    assert [row[0] for table in plain.heads[0.0] for row in table] != firsts
    assert planted.model["num_key_value_heads"] == 2 and planted.calibration["lengths"] == [160]
    shares = [planted.summary[r]["share"] for r in planted.summary]  # r = 4, 8, 16
    assert all(0 < a <= b <= 1 + 1e-6 for x, y in zip(shares, shares[1:]) for a, b in zip(x, y))
    assert shares[-1] == pytest.approx([1.0, 1.0])
    assert min(shares[0]) > max(plain.summary[4.0]["share"])  # the plant concentrates importance


# -- selection ---------------------------------------------------------------------------------


def test_reads_the_soft_vote_top_k_of_the_profile_channels():
    """Oracle: q.k on each KV head's first r profile channels, per-head softmax summed over the
    group, top budget with the sink, window and current token forced."""
    q, k, _, ctx = decode_call(kv_len=300, seed=2)
    method = DoubleSparsity(budget=40, sink=4, window=8, channels=4, profile=CHANNELS)
    selection = method.select_decode(q, DecodeView(k), ctx)
    assert selection.indices.shape == (2, 2, 40)
    forced = set(range(4)) | set(range(300 - 8, 300))
    for b in range(2):
        for kv in range(2):
            ch = RANKING[kv][:4]
            vote = sum(
                (q[b, h, 0, ch] @ k[b, kv][:, ch].T * ctx.scaling).softmax(-1)
                for h in (2 * kv, 2 * kv + 1)
            )
            rest = [j for j in vote.argsort(descending=True).tolist() if j not in forced]
            assert chosen(selection, b, kv) == forced | set(rest[: 40 - len(forced)])


def test_all_channels_select_what_tokenselect_selects():
    """With every channel the approximate scores are exact: the choice equals TokenSelect's."""
    q, k, _, ctx = decode_call(kv_len=300, seed=5)
    knobs = {"budget": 48, "sink": 2, "window": 6}
    ours = DoubleSparsity(channels=16, profile=CHANNELS, **knobs).select_decode(
        q, DecodeView(k), ctx
    )
    exact = TokenSelect(reuse_threshold=2.0, **knobs).select_decode(q, DecodeView(k), ctx)
    for b in range(2):
        for kv in range(2):
            assert chosen(ours, b, kv) == chosen(exact, b, kv)


def test_selects_a_planted_key():
    """A key whose mass lies on KV head 1's top channels, aligned with query head 2, is read."""
    q, k, _, ctx = decode_call(kv_len=512, seed=3)
    target, ch = 201, RANKING[1][:4]
    k[:, 1, target] = 0.0
    k[:, 1, target, ch] = 8.0 * q[:, 2, 0, ch] / q[:, 2, 0, ch].norm(dim=-1, keepdim=True)
    selection = DoubleSparsity(budget=16, channels=4, profile=CHANNELS).select_decode(
        q, DecodeView(k), ctx
    )
    assert all(target in chosen(selection, b, 1) for b in range(2))


# -- the label cache with a model --------------------------------------------------------------


@pytest.mark.parametrize(
    "evict",
    [None, {"sink": 8, "window": 40}, {"sink": 8, "window": 40, "rerotate": True}],
    ids=["full", "ring", "ring-rerotated"],
)
def test_label_cache_after_generate_equals_a_rebuild(evict, llama_profile):
    """After N decode steps the labels kept with the cache equal labels taken from the held
    keys (a full cache appends; a bounded ring cache overwrites slots and, re-rotating, moves
    its sinks' rotation each step), and were built once
    per layer, then only updated."""
    model = make_model("llama")
    ids, mask = left_padded_batch([90, 90], seed=2)
    method = DoubleSparsity(budget=32, sink=4, window=8, channels=4, profile=llama_profile)
    kwargs = {"evict": "streaming", "evict_knobs": evict} if evict else {}
    with sparseattn.sparse_attention(model, decode=method, min_length=0, **kwargs):
        out = generate(model, ids, mask, steps=23)
    ranking = load_profile(llama_profile, "channels").heads[0.0]
    for index, layer in enumerate(out.past_key_values.layers):
        state = layer.state[method.state_key]
        channels = torch.tensor([row[:4] for row in ranking[index]])
        assert state.writes == layer.writes
        assert torch.equal(
            state.buffer[:, :, : layer.keys.shape[2]], labels_of(layer.keys, channels)
        )
    assert sparseattn.last_stats(model).counter("double_sparsity_label_rebuilds") == 2


def test_label_cache_grows_past_its_buffer_by_updates_only():
    """Appends across the buffer's 256-slot step keep the labels equal to a rebuild, with one
    build in all (each step writes only its own slot)."""
    q, k, _, ctx = decode_call(kv_len=260, seed=6)
    method = DoubleSparsity(budget=16, channels=4, profile=CHANNELS)
    channels = torch.tensor([row[:4] for row in RANKING])
    state, counters = {}, {}
    for writes, length in enumerate(range(250, 261), start=1):
        view = DecodeView(k[:, :, :length], state, writes, (length - 1, length), counters=counters)
        step = dataclasses.replace(ctx, kv_len=length, q_offset=length - 1)
        method.select_decode(q, view, step)
        labels = state[method.state_key].buffer[:, :, :length]
        assert torch.equal(labels, labels_of(view.keys, channels))
    assert state[method.state_key].buffer.shape[2] == 512
    assert counters["double_sparsity_label_rebuilds"] == 1


@pytest.mark.parametrize("lengths", [[70, 51], [70, 70]], ids=["padded", "unpadded"])
def test_full_budget_equals_dense_generate(lengths, llama_profile, selection_over_every_key):
    """A selection of every key (gathered with a mask over padded keys, in place unpadded)
    decodes exactly as dense."""
    model = make_model("llama")
    ids, mask = left_padded_batch(lengths, seed=4)
    expected = generate(model, ids, mask)
    knobs = {"budget": covering_budget(ids, steps=8), "channels": 4, "profile": llama_profile}
    with sparseattn.sparse_attention(
        model, decode="double_sparsity", decode_knobs=knobs, min_length=0
    ):
        got = generate(model, ids, mask)
    stats = sparseattn.last_stats(model)
    assert stats.layer_methods("decode") == {0: "double_sparsity", 1: "double_sparsity"}
    assert stats.density("decode") == 1.0  # every visible key read
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )


def test_state_never_crosses_batch_rows_or_calls(llama_profile):
    """A batch of two prompts decodes each exactly as alone; a second generate starts from a
    fresh cache and label cache."""
    model = make_model("llama")
    ids, mask = left_padded_batch([80, 80], seed=5)
    knobs = {"budget": 32, "sink": 4, "window": 8, "channels": 4, "profile": llama_profile}
    with sparseattn.sparse_attention(
        model, decode="double_sparsity", decode_knobs=knobs, min_length=0
    ):
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


def test_decode_has_no_host_sync(llama_profile):
    model = make_model("llama")
    ids, mask = left_padded_batch([120, 97], seed=6)
    knobs = {"budget": 48, "channels": 4, "profile": llama_profile}
    with sparseattn.sparse_attention(
        model, decode="double_sparsity", decode_knobs=knobs, min_length=0
    ):
        run = decode_steps(model, ids, mask)
    assert run.syncs == [[]] * 4
    assert 0 < sparseattn.last_stats(model).density("decode") < 0.6


# -- profiles and knobs ------------------------------------------------------------------------


def test_profile_for_another_architecture_is_refused(llama_profile):
    method = DoubleSparsity(profile=llama_profile)
    with pytest.raises(ValueError, match="was made for tiny: llama .*but the model is gemma3_text"):
        method.bind(tiny_config("gemma3"))
    with pytest.raises(ValueError, match="no shipped channels profile matches llama"):
        DoubleSparsity().bind(tiny_config("llama"))
    with pytest.raises(ValueError, match="profile='auto' needs the model"):
        q, k, _, ctx = decode_call()
        DoubleSparsity(budget=64).select_decode(q, DecodeView(k), ctx)
    other = dataclasses.replace(decode_call()[3], num_kv_heads=1, num_q_heads=2)
    with pytest.raises(ValueError, match="covers 1 layers x 2 heads.*another model"):
        q, k, _, _ = decode_call(hq=2, hkv=1)
        DoubleSparsity(budget=64, profile=CHANNELS).select_decode(q, DecodeView(k), other)


@pytest.mark.parametrize("name", ["nope", "smollm2-135m-minference"])
def test_unknown_profile_names_it_and_the_allowed_ones(name):
    with pytest.raises(
        ValueError,
        match=f"profile='{name}' is not a channels profile; allowed: 'auto', .*"
        "'smollm2-135m-channels'",
    ):
        DoubleSparsity(profile=name)


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="budget=12 is below what is always read .* budget >= 13"):
        DoubleSparsity(budget=12, sink=4, window=8)
    with pytest.raises(ValueError, match="knob channels=0 is out of range"):
        DoubleSparsity(channels=0)
    with pytest.raises(ValueError, match="channels=17 exceeds the head size .*allowed: 1..16"):
        DoubleSparsity(channels=17, profile=CHANNELS)


def test_a_ranking_that_is_not_an_order_of_the_channels_is_refused(tmp_path):
    data = json.loads(open(CHANNELS).read())
    data["heads"]["0"][0][1][5] = 3  # channel 3 twice, channel 5 missing
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not an order of the 16 channels of a head"):
        DoubleSparsity(profile=str(path))

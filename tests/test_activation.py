"""Activation sparsity (cats, teal, rsparse): the kernels against the dense product over the kept
channels, sparsity 0 against dense generate, calibrated thresholds on held-out tokens,
composition with attention settings, and the model restored exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, left_padded_batch, make_model
from transformers import DynamicCache

import sparseattn
from sparseattn.activation import (
    build_activation,
    list_activations,
    load_activation_profile,
    save_activation_profile,
)
from sparseattn.activation.modules import SparseLinear
from sparseattn.backends import cpp, sparse_linear
from sparseattn.bench.activations import SKIP_FIRST, activation_profile
from sparseattn.compat import cache_kwargs
from sparseattn.errors import UsageError
from sparseattn.setting import Setting

METHODS = ("cats", "teal", "rsparse")
HELD_OUT_TOLERANCE = 0.06  # |measured - target| row sparsity per projection on held-out tokens


def random_ids(n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, length), generator=g) for _ in range(n)]


_PROFILES: dict[str, str] = {}


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    """family -> an activations profile calibrated on random tokens (made once per module)."""

    def make(family: str) -> str:
        if family not in _PROFILES:
            model = make_model(family)
            inputs = [(f"r{i}", ids) for i, ids in enumerate(random_ids(4, 160, seed=11))]
            made = activation_profile(
                model, inputs, model_id=f"tiny-{family}", calibration={"lengths": [160], "seed": 11}
            )
            path = tmp_path_factory.mktemp("act") / f"{family}.json"
            save_activation_profile(path, **made)
            _PROFILES[family] = str(path)
        return _PROFILES[family]

    return make


def greedy(model, ids, steps=8, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, **kwargs)


# -- kernels ---------------------------------------------------------------------------------


def oracle_counts(keep: torch.Tensor) -> list[int]:
    return [int(keep.any(0).sum()), keep.shape[1], int(keep.sum()), keep.numel()]


@pytest.mark.parametrize("use_kernel", [True, False])
def test_sparse_input_kernel_equals_the_dense_product_over_kept_channels(use_kernel, monkeypatch):
    if use_kernel:
        assert cpp.available(), f"the C++ kernels did not build: {cpp.reason()}"
    else:
        monkeypatch.setattr(sparse_linear, "uses_kernel", lambda x: False)
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        rows = int(torch.randint(1, 6, (1,), generator=g))
        d_in = int(torch.randint(1, 300, (1,), generator=g))
        d_out = int(torch.randint(1, 200, (1,), generator=g))
        x = torch.randn(rows, d_in, generator=g)
        x[:, ::7] = 0.0  # exact zeros are never read
        w = torch.randn(d_out, d_in, generator=g)
        bias = torch.randn(d_out, generator=g) if trial % 2 else None
        threshold = [0.0, 0.3, 0.8, 5.0][trial % 4]
        counts = torch.zeros(4, dtype=torch.long)
        y = sparse_linear.sparse_input_linear(x, w.T.contiguous(), bias, threshold, counts)
        keep = (x != 0) & (x.abs() >= threshold)
        want = torch.where(keep, x, 0.0).double() @ w.T.double()
        if bias is not None:
            want = want + bias.double()
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)
        assert counts.tolist() == oracle_counts(keep)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_sparse_output_kernel_equals_the_gated_dense_product(use_kernel, monkeypatch):
    if use_kernel:
        assert cpp.available(), f"the C++ kernels did not build: {cpp.reason()}"
    else:
        monkeypatch.setattr(sparse_linear, "uses_kernel", lambda x: False)
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        rows = int(torch.randint(1, 6, (1,), generator=g))
        d_in = int(torch.randint(1, 200, (1,), generator=g))
        d_out = int(torch.randint(1, 300, (1,), generator=g))
        x = torch.randn(rows, d_in, generator=g)
        w = torch.randn(d_out, d_in, generator=g)
        gate = torch.randn(rows, d_out, generator=g)
        bias = torch.randn(d_out, generator=g) if trial % 2 else None
        threshold = [0.0, 0.5, 1.2, 9.0][trial % 4]
        counts = torch.zeros(4, dtype=torch.long)
        h = sparse_linear.sparse_output_linear(x, w, gate, bias, threshold, counts)
        keep = (gate != 0) & (gate.abs() >= threshold)
        dense = x.double() @ w.T.double() + (0 if bias is None else bias.double())
        want = torch.where(keep, gate.double() * dense, 0.0)
        torch.testing.assert_close(h.double(), want, atol=1e-4, rtol=1e-4)
        assert counts.tolist() == oracle_counts(keep)


# -- whole models ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", METHODS)
def test_sparsity_zero_is_token_identical_to_dense(family, name, profiles):
    model = make_model(family)
    ids = random_ids(1, 30, seed=3)[0]
    dense = greedy(model, ids)
    knobs = {"sparsity": 0.0, "profile": profiles(family)}
    with sparseattn.sparse_attention(model, activation=name, activation_knobs=knobs) as stats:
        sparse = greedy(model, ids)
    assert torch.equal(sparse, dense)
    summary = stats.activation.summary()
    assert summary["steps"] == 7  # every decode step ran the stand-ins
    assert summary["weight_read_ratio"] == pytest.approx(1.0, abs=0.02)
    # the same method at 0.5 does drop channels (the path above is the sparse one)
    knobs["sparsity"] = 0.5
    with sparseattn.sparse_attention(model, activation=name, activation_knobs=knobs) as stats:
        greedy(model, ids)
    assert stats.activation.summary()["row_sparsity"] > 0.2


@pytest.mark.parametrize("name", ["cats", "teal"])
def test_thresholds_reach_their_sparsity_on_held_out_tokens(name, profiles):
    """Calibrated on 4 random sequences of 160 tokens; another one decoded token by token over
    the same positions (teacher forcing): each projection's row sparsity is the target within
    HELD_OUT_TOLERANCE (the inputs of later layers also shift with the earlier layers'
    sparsity, which the calibration on the dense model does not see)."""
    model = make_model("llama")
    target = 0.5
    held_out = random_ids(1, 160, seed=99)[0]
    knobs = {"sparsity": target, "profile": profiles("llama")}
    with (
        sparseattn.sparse_attention(model, activation=name, activation_knobs=knobs) as stats,
        torch.no_grad(),
    ):
        cache = DynamicCache(config=model.config)
        model(input_ids=held_out[:, :SKIP_FIRST], **cache_kwargs(model, cache))
        for t in range(SKIP_FIRST, held_out.shape[1]):  # the positions calibration sampled
            model(input_ids=held_out[:, t : t + 1], **cache_kwargs(model, cache))
    measured = stats.activation.sparsity("projection", rows=True)
    want = {"mlp.up_proj", "mlp.down_proj"} if name == "cats" else {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }  # fmt: skip
    assert set(measured) == want
    for site, value in measured.items():
        assert abs(value - target) <= HELD_OUT_TOLERANCE, (site, value)


def test_a_batch_reads_the_union_and_each_row_equals_itself_alone(profiles):
    model = make_model("llama")
    ids, mask = left_padded_batch([20, 14], seed=5)
    knobs = {"sparsity": 0.5, "profile": profiles("llama")}
    with sparseattn.sparse_attention(model, activation="cats", activation_knobs=knobs) as stats:
        batch = greedy(model, ids, attention_mask=mask)
        summary = stats.activation.summary()
        alone = [greedy(model, ids[r : r + 1, -n:]) for r, n in enumerate((20, 14))]
    for row, (n, single) in enumerate(zip((20, 14), alone)):
        assert torch.equal(batch[row, -(n + 8) :], single[0])
    assert summary["sparsity"] < summary["row_sparsity"]  # the union keeps more than a row


def test_weight_bytes_follow_the_channels_read(profiles):
    """One decode step under teal: the bytes the stats report equal the dense bytes less the
    columns of every channel whose input was below its threshold (computed from the stand-ins'
    inputs captured by hooks)."""
    model = make_model("llama")
    ids = random_ids(1, 24, seed=4)[0]
    knobs = {"sparsity": 0.4, "profile": profiles("llama")}
    skipped = []

    def capture(module, args):
        x = args[0].reshape(-1, module.in_features)
        kept = ((x != 0) & (x.abs() >= module.threshold)).any(0)
        skipped.append(int((~kept).sum()) * module.out_features * 4)

    # the stand-ins run as modules (lean_decode=False) so that hooks see their inputs; the lean
    # step's C++ halves report the same counts (test_lean_step)
    with sparseattn.sparse_attention(
        model, activation="teal", activation_knobs=knobs, lean_decode=False
    ) as stats:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, **cache_kwargs(model, cache))
            hooks = [
                m.register_forward_pre_hook(capture)
                for m in model.modules()
                if isinstance(m, SparseLinear)
            ]
            model(input_ids=ids[:, -1:], **cache_kwargs(model, cache))
        for hook in hooks:
            hook.remove()
    dense = sum(p.numel() * 4 for p in model.parameters())  # tiny llama: untied, so less embed
    dense -= model.get_input_embeddings().weight.numel() * 4
    assert len(skipped) == 2 * 7 and sum(skipped) > 0
    assert stats.activation.summary()["weight_bytes_dense"] == dense
    assert stats.activation.weight_bytes_per_step() == dense - sum(skipped)


def test_composition_equals_each_alone_where_they_do_not_interact(profiles):
    model = make_model("llama")
    ids = random_ids(1, 64, seed=6)[0]
    act = {"profile": profiles("llama")}
    quest = {"decode": "quest", "decode_knobs": {"budget": 32, "full_layers": 0}, "min_length": 0}
    # prefill: activation sparsity never acts, the prompt's logits are the attention method's
    with torch.no_grad():
        a_shape = {"prefill_knobs": {"sink": 16, "window": 16, "block_size": 16}, "min_length": 0}
        with sparseattn.sparse_attention(model, prefill="streaming", **a_shape) as stats:
            alone = model(input_ids=ids).logits
            assert stats.density("prefill") < 1
        teal = {"activation": "teal", "activation_knobs": {**act, "sparsity": 0.5}}
        with sparseattn.sparse_attention(model, prefill="streaming", **a_shape, **teal):
            both = model(input_ids=ids).logits
    assert torch.equal(both, alone)
    # decode at activation sparsity 0 equals the attention setting alone
    with sparseattn.sparse_attention(model, **quest) as stats:
        quest_alone = greedy(model, ids)
        density = stats.density("decode")
    knobs = {**act, "sparsity": 0.0}
    with sparseattn.sparse_attention(model, **quest, activation="teal", activation_knobs=knobs):
        assert torch.equal(greedy(model, ids), quest_alone)
        assert sparseattn.last_stats(model).density("decode") == density < 1
    # decode attention that reads every key equals the activation method alone
    knobs = {**act, "sparsity": 0.5}
    with sparseattn.sparse_attention(model, activation="cats", activation_knobs=knobs):
        cats_alone = greedy(model, ids)
    covering = {"decode": "quest", "decode_knobs": {"budget": 128, "full_layers": 0}}
    with sparseattn.sparse_attention(model, **covering, activation="cats", activation_knobs=knobs):
        assert torch.equal(greedy(model, ids), cats_alone)


@pytest.mark.parametrize("name", METHODS)
def test_the_model_is_restored_exactly(name, profiles):
    model = make_model("gemma3")
    before_modules = dict(model.named_modules())
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = random_ids(1, 20, seed=7)[0]
    dense = greedy(model, ids)
    knobs = {"sparsity": 0.5, "profile": profiles("gemma3")}
    with sparseattn.sparse_attention(model, activation=name, activation_knobs=knobs):
        assert list(model.state_dict()) == list(before_state)  # the same names inside
        greedy(model, ids)
        assert dict(model.named_modules()) != before_modules  # stand-ins are in
    assert dict(model.named_modules()) == before_modules  # the same objects, back in place
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before_state.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(greedy(model, ids), dense)


def test_setting_roles_and_errors(profiles, tmp_path):
    setting = Setting.parse(
        "prefill=xattention;decode=quest[budget=64];activation=cats[sparsity=0.4]"
    )
    assert setting.label.endswith("activation=cats[sparsity=0.4]")
    assert setting.family == "xattention+quest+act:cats"
    assert setting.hook_kwargs()["activation"].sparsity == 0.4
    assert Setting.parse("teal[sparsity=0.5]").activation.name == "teal"
    assert "activation" not in Setting.parse("quest").to_json()
    assert set(list_activations()) >= set(METHODS)
    with pytest.raises(UsageError, match="unknown activation method 'relu'.*cats"):
        build_activation("relu")
    with pytest.raises(UsageError, match=r"sparsity=1.5 is out of range"):
        build_activation("teal", sparsity=1.5)
    no_method = {"activation_knobs": {"sparsity": 0.1}}
    with (
        pytest.raises(UsageError, match="activation_knobs .* without activation="),
        sparseattn.sparse_attention(make_model("llama"), **no_method),
    ):
        pass
    # a profile made for another architecture is refused, naming the model it was made for
    other = make_model("llama")
    foreign = {"activation": "cats", "activation_knobs": {"profile": profiles("gemma3")}}
    with (
        pytest.raises(UsageError, match="was made for tiny-gemma3"),
        sparseattn.sparse_attention(other, **foreign),
    ):
        pass
    with (
        pytest.raises(UsageError, match="no shipped activations profile matches"),
        sparseattn.sparse_attention(other, activation="teal"),
    ):
        pass
    broken = tmp_path / "broken.json"
    data = json.loads(Path(profiles("llama")).read_text())
    data["thresholds"]["0.5"] = data["thresholds"]["0.5"][:1]
    broken.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="not one row of"):
        load_activation_profile(str(broken))


def test_rsparse_low_rank_part_and_its_budget_search():
    """At full rank the low-rank part makes any threshold exact (W x_kept + W x_rest = W x); on a
    nearly low-rank weight the per-layer search spends budget on rank, not only channels."""
    from sparseattn.activation.modules import DecodeSwitch
    from sparseattn.activation.rsparse import low_rank_factors
    from sparseattn.activation.stats import SiteCounter
    from sparseattn.bench.activations import LEVELS, RSPARSE_LEVELS, choose_shares, quantile_rows

    g = torch.Generator().manual_seed(8)
    linear = torch.nn.Linear(48, 40, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 4, generator=g) @ torch.randn(4, 48, generator=g))
        linear.weight.add_(0.01 * torch.randn(40, 48, generator=g))
    x = torch.randn(3, 48, generator=g)
    full = SparseLinear(
        linear, 0.7, SiteCounter(160), DecodeSwitch(True), low_rank_factors(linear.weight, 40)
    )
    torch.testing.assert_close(full(x), linear(x), atol=1e-4, rtol=1e-4)
    rank4 = SparseLinear(
        linear, 0.7, SiteCounter(160), DecodeSwitch(True), low_rank_factors(linear.weight, 4)
    )
    kept = torch.where(x.abs() >= 0.7, x, 0.0)
    u, s, vh = torch.linalg.svd(linear.weight.detach())
    approx = kept @ linear.weight.T + (x - kept) @ (u[:, :4] * s[:4] @ vh[:4]).T
    torch.testing.assert_close(rank4(x), approx, atol=1e-4, rtol=1e-4)
    rows = torch.randn(256, 48, generator=g)
    shares = choose_shares(rows, linear.weight, quantile_rows(rows, LEVELS), LEVELS)
    assert len(shares) == len(RSPARSE_LEVELS) and max(shares) < 1.0


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_profiles_are_monotone(name):
    """Every site's thresholds grow with the sparsity from 0; R-Sparse's shares are searched
    values; the profile covers every layer of the model it names."""
    from sparseattn.activation.rsparse import SHARES

    profile = load_activation_profile(f"{name}-activations")
    assert profile.model["id"] == name
    table = torch.tensor([profile.thresholds[level] for level in profile.levels])  # (lv, L, S)
    assert table.shape[1:] == (profile.model["num_hidden_layers"], len(profile.sites))
    assert bool((table[0] == 0).all()) and bool((table.diff(dim=0) >= 0).all())
    shares = {v for level in profile.rsparse.values() for row in level for v in row}
    assert shares <= set(SHARES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_profiles_match_the_real_models(name):
    """The built-in model's own config (read from its GGUF file) finds its shipped activations
    profile by architecture."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from sparseattn import models
    from sparseattn.activation.profile import shipped_activation_profile_for

    path = models._smollm2_path() if name == "smollm2-135m" else models._gemma3_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert shipped_activation_profile_for(SimpleNamespace(config=config)).model["id"] == name


# -- TEAL's greedy allocation ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_allocation_meets_each_block_target(family, profiles):
    """Every layer's parameter-weighted mean sparsity is the stored target; sites reading one
    input share one sparsity (q/k/v, gate/up); CATS's site is not a linear layer (0)."""
    from sparseattn.activation.profile import ACT_SITE
    from sparseattn.activation.sites import decoder_layers, linear_sites

    model = make_model(family)
    profile = load_activation_profile(profiles(family))
    assert profile.teal_greedy and sorted(profile.teal_greedy) == [0.25, 0.4, 0.5, 0.6]
    for target, table in profile.teal_greedy.items():
        for layer_idx, layer in enumerate(decoder_layers(model)):
            row = dict(zip(profile.sites, table[layer_idx]))
            sizes = {s: m.weight.numel() for s, m in linear_sites(layer).items()}
            mean = sum(sizes[s] * row[s] for s in sizes) / sum(sizes.values())
            assert mean == pytest.approx(target, abs=1e-3)
            assert row["self_attn.q_proj"] == row["self_attn.k_proj"] == row["self_attn.v_proj"]
            assert row["mlp.gate_proj"] == row["mlp.up_proj"]
            assert row.get(ACT_SITE, 0.0) == 0.0


def test_greedy_takes_the_free_steps_first():
    """A layer whose o_proj is zero has an attention branch that adds nothing: sparsifying any
    attention input costs no output error, so the greedy search drops attention channels
    before any MLP channel (hand-derived case)."""
    from sparseattn.activation.sites import decoder_layers
    from sparseattn.bench.teal_greedy import capture_layer_inputs, greedy_layer

    model = make_model("llama")
    layer = decoder_layers(model)[0]
    layer.self_attn.o_proj.weight.data.zero_()
    inputs = [(f"r{i}", ids) for i, ids in enumerate(random_ids(2, 64, seed=5))]
    calls, groups = capture_layer_inputs(model, inputs)
    assert [sorted(g) for g in groups[0]] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # thresholds: the level's quantile of |x| per site on the captured inputs
    rows = {}

    def keep(site):
        def hook(module, args):
            rows.setdefault(site, args[0].abs().flatten())

        return hook

    with torch.no_grad():
        for site, linear in layer.named_modules():
            if isinstance(linear, torch.nn.Linear):
                handle = linear.register_forward_pre_hook(keep(site))
                layer(*calls[0][0][0], **calls[0][0][1])
                handle.remove()
    quantile = lambda site, level: float(rows[site].quantile(level)) if level > 0 else 0.0
    found = greedy_layer(layer, calls[0], groups[0], quantile)
    low = found[0.25]
    attention = [low[s] for s in low if s.startswith("self_attn")]
    mlp = [low[s] for s in low if s.startswith("mlp")]
    assert min(attention) >= max(mlp)
    assert max(mlp) == 0.0 or min(attention) >= 0.9


def test_teal_greedy_knob(profiles, tmp_path):
    model = make_model("llama")
    ids = random_ids(1, 30, seed=3)[0]
    dense = greedy(model, ids)
    knobs = {"sparsity": 0.0, "allocation": "greedy", "profile": profiles("llama")}
    with sparseattn.sparse_attention(model, activation="teal", activation_knobs=knobs):
        assert torch.equal(greedy(model, ids), dense)  # sparsity 0: dense, token for token
    knobs["sparsity"] = 0.5
    with sparseattn.sparse_attention(model, activation="teal", activation_knobs=knobs) as stats:
        greedy(model, ids)
    by_site = stats.activation.sparsity("projection", rows=True)
    assert len({round(v, 2) for v in by_site.values()}) > 1  # not one sparsity everywhere
    assert build_activation("teal", sparsity=0.5, allocation="greedy").label == (
        "teal[sparsity=0.5,allocation=greedy]"
    )
    with pytest.raises(UsageError, match="allocation='nope' is not allowed"):
        build_activation("teal", allocation="nope")
    too_high = {**knobs, "sparsity": 0.7}
    with (
        pytest.raises(UsageError, match="stored up to sparsity 0.6"),
        sparseattn.sparse_attention(model, activation="teal", activation_knobs=too_high),
    ):
        pass
    plain = json.loads(Path(profiles("llama")).read_text())
    del plain["teal_greedy"]
    bare = tmp_path / "no-greedy.json"
    bare.write_text(json.dumps(plain))
    no_table = {**knobs, "profile": str(bare)}
    with (
        pytest.raises(UsageError, match="has no greedy allocation"),
        sparseattn.sparse_attention(model, activation="teal", activation_knobs=no_table),
    ):
        pass

"""Per-head profiles: calibration choices, per-head execution, model checks, shipped files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, tiny_config
from test_backends import make_call

import sparseattn
from sparseattn.backends import BlockLayout
from sparseattn.bench.calibrate import (
    MINFERENCE_BUDGETS,
    MINFERENCE_CHOICES,
    XATTENTION_TARGETS,
    XATTENTION_THRESHOLDS,
    _choose,
    calibrate,
    write_profile,
)
from sparseattn.errors import UsageError
from sparseattn.profiles import fingerprint, load_profile, shipped_profiles
from sparseattn.registry import build_method

CONTRACT = str(Path(__file__).parent / "data" / "minference-contract.json")


def test_minference_runs_each_head_with_its_own_pattern():
    """Oracle: each head's tiles equal the assigned pattern run on that head alone."""
    q, k, v, ctx = make_call(256, 256, seed=3)
    layout = BlockLayout(ctx, 32)
    profile = load_profile(CONTRACT, "minference")
    for budget in profile.levels:
        method = build_method("minference", block_size=32, budget=budget, profile=CONTRACT)
        got = method.select(q, k, ctx, layout).mask
        for head, choice in enumerate(profile.layer(budget, 0, 4)):
            alone = build_method(choice["pattern"], block_size=32, **choice["knobs"])
            kv_head = head // ctx.groups
            one = dataclasses.replace(ctx, num_q_heads=1, num_kv_heads=1)
            want = alone.select(q[:, head : head + 1], k[:, kv_head : kv_head + 1], one, layout)
            assert torch.equal(got[:, head], want.mask[:, 0]), (budget, head, choice)
    # the two budgets assign different patterns, so the selections differ
    low = build_method("minference", block_size=32, budget=0.3, profile=CONTRACT)
    high = build_method("minference", block_size=32, budget=0.6, profile=CONTRACT)
    assert not torch.equal(low.select(q, k, ctx, layout).mask, high.select(q, k, ctx, layout).mask)


def test_budget_picks_largest_stored_level_at_or_below():
    profile = load_profile(CONTRACT, "minference")
    assert profile.level_at_most(0.5) == 0.3
    assert profile.level_at_most(0.6) == 0.6
    assert profile.level_at_most(0.05) == 0.3  # below every level: the smallest
    assert profile.level_at_least(0.31) == 0.6
    assert profile.level_at_least(0.9) == 0.6


def test_choose_minference_takes_best_recall_within_budget():
    # one layer, three candidates, two heads; scores[layer, cand, (recall, density), head]
    scores = torch.tensor(
        [
            [
                [[0.70, 0.90], [0.10, 0.10]],  # candidate 0: sparse
                [[0.95, 0.91], [0.25, 0.25]],  # candidate 1: mid
                [[0.99, 0.99], [0.60, 0.60]],  # candidate 2: dense-ish
            ]
        ]
    )
    scores = torch.nn.functional.pad(scores, (0, 0, 0, 0, 0, len(MINFERENCE_CHOICES) - 3))
    scores[:, 3:, 1] = 2.0  # the other candidates never fit
    heads, summary = _choose("minference", scores)
    assert heads[0.1] == [[0, 0]]
    assert heads[0.2] == [[0, 0]]
    assert heads[0.3] == [[1, 1]]
    assert heads[0.5] == [[1, 1]]
    assert summary[0.3]["recall"] == [pytest.approx(0.93)]
    assert summary[0.3]["density"] == [pytest.approx(0.25)]


def test_choose_minference_falls_back_to_sparsest_when_nothing_fits():
    scores = torch.zeros(1, len(MINFERENCE_CHOICES), 2, 1)
    scores[:, :, 0] = 1.0
    scores[:, :, 1] = torch.linspace(0.9, 0.6, len(MINFERENCE_CHOICES))[None, :, None]
    heads, _ = _choose("minference", scores)
    assert heads[0.1] == [[len(MINFERENCE_CHOICES) - 1]]


def test_choose_xattention_takes_smallest_threshold_reaching_the_target():
    n = len(XATTENTION_THRESHOLDS)
    scores = torch.zeros(1, n, 2, 2)
    scores[0, :, 0, 0] = torch.linspace(0.5, 0.99, n)  # head 0: recall rises with threshold
    scores[0, :, 0, 1] = 0.5  # head 1 never reaches any target: the largest threshold
    heads, _ = _choose("xattention", scores)
    for target in XATTENTION_TARGETS:
        first = next(i for i in range(n) if float(scores[0, i, 0, 0]) >= target - 1e-9)
        assert heads[target][0][0] == XATTENTION_THRESHOLDS[first]
        assert heads[target][0][1] == XATTENTION_THRESHOLDS[-1]


def _xattention_profile(tmp_path, thresholds: list[float], fp: dict) -> str:
    path = tmp_path / "x.json"
    from sparseattn.profiles import save_profile

    save_profile(
        path,
        kind="xattention",
        model={"id": "test", **fp},
        calibration={},
        heads={0.9: [thresholds]},
        summary={0.9: {"recall": [0.9], "density": [0.5]}},
    )
    return str(path)


def test_xattention_per_head_thresholds(tmp_path):
    """Oracle: head h under the profile selects what threshold t_h selects without one."""
    q, k, v, ctx = make_call(256, 256, seed=4)
    layout = BlockLayout(ctx, 32)
    thresholds = [0.3, 0.6, 0.9, 0.99]
    fp = {"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 4}
    path = _xattention_profile(tmp_path, thresholds, fp)
    got = build_method("xattention", block_size=32, profile=path).select(q, k, ctx, layout).mask
    for head, t in enumerate(thresholds):
        alone = build_method("xattention", block_size=32, threshold=t).select(q, k, ctx, layout)
        assert torch.equal(got[:, head], alone.mask[:, head])
    assert got[:, 0].sum() < got[:, 3].sum()
    dense = build_method("xattention", block_size=32, profile=path, threshold=1.0)
    assert dense.select(q, k, ctx, layout).mask.sum() == layout.visible.sum() * 4


def test_profile_for_another_architecture_is_refused():
    method = build_method("minference", profile=CONTRACT)
    with pytest.raises(
        ValueError, match="was made for .*llama \\(1 layers.*but the model is qwen2"
    ):
        method.bind(tiny_config("qwen2"))


def test_no_shipped_profile_for_an_unknown_model_says_how_to_make_one():
    model = make_model("llama")
    with pytest.raises(ValueError, match="no shipped minference profile.*sparseattn profile"):
        with sparseattn.sparse_attention(model, "minference"):
            pass
    with pytest.raises(ValueError, match="needs the model"):
        q, k, v, ctx = make_call(64, 64)
        build_method("minference").select(q, k, ctx, BlockLayout(ctx, 128))


@pytest.mark.parametrize(
    "profile, message",
    [
        ("missing.json", "does not exist"),
        ("no-such-profile", "neither a .json file nor a shipped profile"),
    ],
)
def test_bad_profile_names(profile, message):
    with pytest.raises(ValueError, match=message):
        build_method("minference", profile=profile)


def test_wrong_kind_is_refused(tmp_path):
    path = _xattention_profile(tmp_path, [0.9] * 4, {"model_type": "llama"})
    with pytest.raises(ValueError, match="is a 'xattention' profile; 'minference' is needed"):
        build_method("minference", profile=path)


@pytest.mark.parametrize("kind", ["minference", "xattention"])
def test_calibrated_profile_round_trips_and_drives_the_model(tmp_path, kind, monkeypatch):
    """Calibrate on a tiny model, reload, and run the model with it through the hook."""
    from sparseattn.bench import calibrate as cal

    def random_inputs(tokenizer, lengths, seed, samples):  # the tasks need a real tokenizer
        g = torch.Generator().manual_seed(seed)
        for length in lengths:
            for s in range(samples):
                yield f"random@{length}#{s}", torch.randint(0, 128, (1, length), generator=g)

    monkeypatch.setattr(cal, "calibration_inputs", random_inputs)
    model = make_model("llama")
    profile = calibrate(
        model, None, kind=kind, model_id="tiny", lengths=[256], samples=2, block_size=32
    )
    path = tmp_path / f"tiny-{kind}.json"
    write_profile(str(path), profile)
    loaded = load_profile(str(path), kind)
    levels = MINFERENCE_BUDGETS if kind == "minference" else XATTENTION_TARGETS
    assert loaded.levels == tuple(levels)
    assert loaded.model["num_hidden_layers"] == 2
    for level in levels:
        table = loaded.heads[level]
        assert len(table) == 2 and all(len(row) == 4 for row in table)
        summary = loaded.summary[level]
        assert all(0 < r <= 1 + 1e-6 for r in summary["recall"])
        assert all(0 < d <= 1 + 1e-6 for d in summary["density"])
    # larger budgets / targets never lower the calibrated recall
    recalls = [sum(loaded.summary[lv]["recall"]) for lv in levels]
    assert recalls == sorted(recalls)

    ids = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(1))
    knobs = {"budget": 0.2} if kind == "minference" else {"threshold": 0.85}
    with sparseattn.sparse_attention(
        model, kind, block_size=32, profile=str(path), min_length=0, **knobs
    ):
        with torch.no_grad():
            model(input_ids=ids)
        stats = sparseattn.last_stats(model)
    assert 0 < stats.density("prefill") < 1


def test_shipped_profiles_are_well_formed():
    shipped = shipped_profiles()
    assert {"smollm2-135m-minference", "smollm2-135m-xattention"} <= set(shipped)
    assert {"smollm2-135m-channels", "gemma3-270m-channels"} <= set(shipped)
    assert {"smollm2-135m-retrieval", "gemma3-270m-retrieval"} <= set(shipped)
    assert {"smollm2-135m-moa", "gemma3-270m-moa"} <= set(shipped)
    assert {"smollm2-135m-duo", "gemma3-270m-duo"} <= set(shipped)
    for name, path in shipped.items():
        data = json.loads(path.read_text())
        kind = data["kind"]  # named MODEL-KIND, or MODEL-KIND-VARIANT (never picked by 'auto')
        assert name.endswith("-" + kind) or ("-" + kind + "-") in name
        profile = load_profile(name, kind)
        assert data["calibration"]["lengths"] and "seed" in data["calibration"]
        per_kv_head = kind in ("channels", "moa", "duo")
        per_layer = "num_key_value_heads" if per_kv_head else "num_attention_heads"
        for level in profile.levels:
            table = profile.heads[level]
            assert len(table) == profile.model["num_hidden_layers"]
            assert all(len(row) == profile.model[per_layer] for row in table)
        assert path.stat().st_size < 64 * 1024


def test_fingerprint_of_a_sliding_window_config():
    fp = fingerprint(tiny_config("gemma3"))
    assert fp == {
        "model_type": "gemma3_text",
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }


def test_minference_leaves_sliding_layers_as_they_are():
    q, k, v, ctx = make_call(256, 256, window=64, seed=2)
    layout = BlockLayout(ctx, 32)
    method = build_method("minference", block_size=32, budget=0.3, profile=CONTRACT)
    sel = method.select(q, k, ctx, layout).mask
    assert torch.equal(sel, layout.visible[:, None].expand_as(sel))


@pytest.mark.parametrize("kind", ["minference", "xattention", "channels", "retrieval", "moa"])
def test_shipped_smollm2_profile_matches_the_real_model_config(kind):
    """The built-in model's own config (read from its GGUF file) finds its shipped profile."""
    from transformers import AutoConfig

    from sparseattn.models import _smollm2_path
    from sparseattn.profiles import shipped_for

    path = _smollm2_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert shipped_for(config, kind).model["id"] == "smollm2-135m"


def test_profile_refuses_other_tile_size_or_stride():
    with pytest.raises(ValueError, match="calibrated with block_size=128.*--block-size 64"):
        build_method("minference", block_size=64, profile="smollm2-135m-minference")
    with pytest.raises(ValueError, match="calibrated with stride=8"):
        build_method("xattention", stride=16, profile="smollm2-135m-xattention")
    build_method("xattention", stride=8, profile="smollm2-135m-xattention")  # matches: fine


def test_last_weight_objective_mixes_the_last_query_tiles_recall():
    """Hand-computed: over 2 query tiles x 2 key tiles, a mask missing the last row's column 0."""
    from sparseattn.bench.calibrate import _head_scores

    _, _, _, ctx = make_call(64, 64)  # tiles of 32: a 2 x 2 causal map
    layout = BlockLayout(ctx, 32)
    mass = torch.tensor([[1.0, 0.0], [0.8, 0.2]]).expand(ctx.batch, ctx.num_q_heads, 2, 2)
    mask = torch.tensor([[True, False], [False, True]]).expand_as(mass)
    overall = (1.0 + 0.2) / 2.0  # each query tile's row holds one unit of mass
    last = 0.2
    for weight in (0.0, 0.5, 1.0):
        recall, _ = _head_scores(mass, mask, layout, weight)
        expected = (1 - weight) * overall + weight * last
        torch.testing.assert_close(recall, torch.full_like(recall, expected))


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_last_weight_outside_0_1_is_refused(weight):
    with pytest.raises(UsageError, match=f"last_weight={weight}.*allowed range"):
        calibrate(
            make_model("llama"),
            None,
            kind="minference",
            model_id="t",
            lengths=[64],
            last_weight=weight,
        )

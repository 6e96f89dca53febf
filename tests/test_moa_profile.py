"""MoA span profiling: influence against finite differences, rule costs against explicit
masking, the budgeted solver against brute force, and the profile file."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import make_model, tiny_config
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparseattn.bench.calibrate import write_profile
from sparseattn.bench.influence import (
    distance_influence,
    influence_matrix,
    response_gradients,
)
from sparseattn.bench.moa import moa_profile
from sparseattn.bench.spans import (
    kept_share,
    kept_tokens,
    rule_losses,
    solve_budget,
    span_rules,
)
from sparseattn.errors import UsageError
from sparseattn.integration.hf import model_configs
from sparseattn.profiles import load_profile, span_at

# -- span rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 5, 16, 40])
def test_kept_tokens_counts_the_keys_the_last_query_keeps(window):
    """Oracle: the keys of the last query counted one by one."""
    for length, alpha, beta, sink in itertools.product(
        (8, 20, 33), (-8, 0, 3, 12), (0.0, 0.25, 0.5, 1.0), (0, 2, 4, 40)
    ):
        rule = {"alpha": alpha, "beta": beta, "sink": sink}
        span = span_at(rule, length)
        last = length - 1
        kept = [
            j
            for j in range(length)
            if (j < sink or last - j < span) and (window is None or last - j < window)
        ]
        assert kept_tokens(rule, length, window) == len(kept), (rule, length, window)


def test_span_rules_are_valid_at_the_profiled_lengths_and_sparsest_first():
    lengths = [2048, 4096]
    rules = span_rules(lengths)
    assert {"alpha": 0, "beta": 1.0, "sink": 64} in rules  # the full rule
    for rule in rules:
        assert rule["alpha"] + rule["beta"] * 2048 >= 1
        assert rule["alpha"] + rule["beta"] * 4096 <= 4096
    share = kept_share(rules, lengths, [None])[0]
    assert torch.all(share[1:] >= share[:-1])
    assert share[-1] == 1.0


# -- influence: first order, renormalised, against finite differences -----------------------

_PERTURB: dict = {}


def _explicit_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention; the chosen (layer, head, row) gets A + t * dA, where dA is the exact
    change of masking key j and renormalising the row (the oracle's perturbation)."""
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, 1)
    v = value.repeat_interleave(g, 1)
    logits = query @ k.transpose(-1, -2) * scaling  # (B, Hq, L, L)
    if attention_mask is None:
        L = logits.shape[-1]
        attention_mask = torch.ones(L, L, dtype=torch.bool).tril()
    probs = logits.masked_fill(~attention_mask.bool(), float("-inf")).softmax(-1)
    target = _PERTURB.get("at")
    if target is not None and target[0] == module.layer_idx:
        _, head, i, j, t = target
        row = probs[0, head, i]
        masked = row.clone()
        masked[j] = 0.0
        masked = masked / masked.sum()
        probs = probs.clone()
        probs[0, head, i] = row + t * (masked - row)
    return (probs @ v).transpose(1, 2), None


AttentionInterface.register("test_explicit", _explicit_attention)
AttentionMaskInterface.register("test_explicit", sdpa_mask)


def _response_loss(model, ids, response):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -response - 1 : -1]
    return torch.nn.functional.cross_entropy(logits, ids[0, -response:])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_influence_equals_the_finite_difference_of_masking_an_entry(family):
    """E_ij = d/dt L(A + t dA) at t = 0, dA the exact masking of entry (i, j) with the row
    renormalised (MoA's first-order estimate), computed by explicit eager attention in
    float64. Gemma 3's sliding layers exercise the window."""
    model = make_model(family).double()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    response = 6
    captures, loss = response_gradients(model, ids, response)
    configs = model_configs(model)
    previous = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "test_explicit"
    try:
        assert _response_loss(model, ids, response).item() == pytest.approx(loss, rel=1e-9)
        checked = 0
        for layer, capture in sorted(captures.items()):
            effect = influence_matrix(capture)  # (Hq, L, L)
            for head, i, j in [(0, 37, 3), (1, 36, 30), (3, 39, 20), (2, 20, 1)]:
                if capture.window is not None and i - j >= capture.window:
                    assert effect[head, i, j] == 0.0  # outside the layer's own window
                    continue
                t = 1e-2  # RMSNorm runs in float32 even in a float64 model: no smaller step
                _PERTURB["at"] = (layer, head, i, j, t)
                up = _response_loss(model, ids, response)
                _PERTURB["at"] = (layer, head, i, j, -t)
                down = _response_loss(model, ids, response)
                finite = float((up - down) / (2 * t))
                scale = float(effect.abs().max())
                assert float(effect[head, i, j]) == pytest.approx(finite, abs=2e-3 * scale)
                checked += 1
        assert checked >= 8
    finally:
        _PERTURB.pop("at", None)
        for c, name in zip(configs, previous):
            c._attn_implementation = name


def test_rule_cost_equals_the_influence_of_the_entries_it_masks():
    """Oracle: |E| summed over the explicitly enumerated dropped entries of each rule."""
    model = make_model("gemma3")
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    captures, _ = response_gradients(model, ids, 5)
    sink = 3
    rules = [{"alpha": a, "beta": b, "sink": sink} for a, b in [(1, 0.0), (4, 0.25), (0, 0.5)]]
    i = torch.arange(48)[:, None]
    j = torch.arange(48)[None, :]
    for layer, capture in captures.items():
        effect = influence_matrix(capture).abs()  # (Hq, L, L)
        got = rule_losses(distance_influence(capture, sink), rules)  # (Hkv, C)
        for c, rule in enumerate(rules):
            dropped = (j <= i) & (j >= sink) & (i - j >= span_at(rule, 48))
            per_query_head = (effect * dropped).sum((-1, -2))  # (Hq,)
            want = per_query_head.view(2, 2).sum(-1)  # summed over each GQA group
            assert torch.allclose(got[:, c].float(), want, rtol=1e-4, atol=1e-7), (layer, c)


# -- the budgeted choice ---------------------------------------------------------------------


def _brute_force(loss, share, budget):
    H, C = loss.shape
    best = (math.inf, None)
    for pick in itertools.product(range(C), repeat=H):
        if sum(share[h, c] for h, c in enumerate(pick)) <= budget * H + 1e-9:
            total = sum(loss[h, c] for h, c in enumerate(pick))
            best = min(best, (float(total), pick))
    return best


def test_solver_finds_the_known_optimum_within_the_budget():
    # head 0 loses a lot without its long span, head 1 nothing: head 0 gets the budget
    loss = torch.tensor([[9.0, 4.0, 0.0], [0.2, 0.1, 0.0]], dtype=torch.float64)
    share = torch.tensor([[0.1, 0.3, 0.9], [0.1, 0.3, 0.9]], dtype=torch.float64)
    assert solve_budget(loss, share, 0.5).tolist() == [2, 0]
    assert solve_budget(loss, share, 0.2).tolist() == [1, 0]  # 0.3 + 0.1 fits 2 x 0.2
    assert solve_budget(loss, share, 0.05).tolist() == [0, 0]  # nothing fits: the sparsest
    assert solve_budget(loss, share, 1.0).tolist() == [2, 2]


@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force_on_random_tables(seed):
    g = torch.Generator().manual_seed(seed)
    H, C = 4, 4
    share = torch.sort(torch.randint(1, 1000, (H, C), generator=g).double() / 1000).values
    loss = torch.sort(torch.rand(H, C, generator=g, dtype=torch.float64) * 5, descending=True)
    loss = loss.values
    checked = 0
    for budget in (0.2, 0.35, 0.5, 0.7):
        optimum, _ = _brute_force(loss, share, budget)
        chosen = solve_budget(loss, share, budget)
        if optimum == math.inf:  # nothing fits: every head takes its sparsest rule
            assert chosen.tolist() == share.argmin(1).tolist()
            continue
        checked += 1
        assert float(share.gather(1, chosen[:, None]).sum()) <= budget * H + 1e-9
        total = float(loss.gather(1, chosen[:, None]).sum())
        assert total == pytest.approx(optimum), (budget, chosen)
    assert checked >= 2


# -- the profile -----------------------------------------------------------------------------


def _random_prompts(lengths, response, samples=2):
    g = torch.Generator().manual_seed(5)
    for n in lengths:
        for s in range(samples):
            yield f"random@{n}#{s}", n, torch.randint(3, 128, (1, n - response), generator=g)


def test_moa_profile_round_trips_and_respects_each_budget(tmp_path):
    model = make_model("gemma3")
    lengths, response, sink = [256, 512], 8, 4
    profile = moa_profile(
        model,
        None,
        model_id="tiny-gemma3",
        lengths=lengths,
        sink=sink,
        response=response,
        prompts=_random_prompts(lengths, response),
    )
    path = tmp_path / "tiny-moa.json"
    write_profile(str(path), profile)
    loaded = load_profile(str(path), "moa")
    assert loaded.levels == (0.1, 0.25, 0.5, 0.75)
    assert loaded.choices == span_rules(lengths, sink)
    assert loaded.calibration["sliding_layers"] == {"0": 24, "1": 24}
    windows = [24, 24, None]
    for level in loaded.levels:
        table = loaded.heads[level]
        assert len(table) == 3 and all(len(row) == 2 for row in table)  # layers x KV heads
        rules = [loaded.layer(level, layer, 2) for layer in range(3)]
        share = [
            sum(kept_tokens(r, n, windows[layer]) / n for n in lengths) / len(lengths)
            for layer in range(3)
            for r in rules[layer]
        ]
        assert sum(share) / len(share) <= level + 1e-9
        assert loaded.summary[level]["share"] == [
            pytest.approx(sum(share[2 * i : 2 * i + 2]) / 2, abs=1e-4) for i in range(3)
        ]
    # a larger budget never predicts a larger loss
    totals = [sum(loaded.summary[level]["loss"]) for level in loaded.levels]
    assert totals == sorted(totals, reverse=True)
    with pytest.raises(
        UsageError, match="was made for tiny-gemma3: gemma3_text .*but the model is llama"
    ):
        loaded.check_model(tiny_config("llama"))


def test_moa_profile_needs_two_lengths():
    with pytest.raises(UsageError, match="at least two different lengths"):
        moa_profile(make_model("llama"), None, model_id="x", lengths=[64, 64])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["choices"][0].update(beta=2.0), "span rule .* is not"),
        (lambda d: d["heads"]["0.1"][0].__setitem__(0, 99), "choice index 99 outside"),
        (lambda d: d["heads"]["0.1"][0].append(0), "not 2 entries long"),
    ],
)
def test_malformed_moa_profiles_are_refused(tmp_path, edit, message):
    rules = span_rules([64, 128], 4)
    data = {
        "format": 1,
        "kind": "moa",
        "model": {"id": "m", "num_hidden_layers": 2, "num_key_value_heads": 2},
        "choices": rules,
        "heads": {"0.1": [[0, 1], [2, 3]]},
    }
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError, match=message):
        load_profile(str(path), "moa")

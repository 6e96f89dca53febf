"""The lean decode step (integration/step.py) against the layers' own forward: same logits,
same tokens, for every family it takes, with decode methods, eviction and activation sparsity;
families it does not take keep their forward; leaving the block restores the modules."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, make_model

import sparseattn
from sparseattn.activation import save_activation_profile
from sparseattn.bench.activations import activation_profile
from sparseattn.compat import cache_kwargs, output_cache
from sparseattn.integration.step import COUNTER

STEPS = 6


def generate(model, ids, mask, lean: bool, **setting):
    with (
        torch.inference_mode(),
        sparseattn.sparse_attention(model, min_length=0, lean_decode=lean, **setting) as stats,
    ):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        lean_calls = stats.counter(COUNTER) or 0
    return out, lean_calls


def assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lean_step_equals_the_modules_with_left_padding(family):
    model = make_model(family)
    ids, mask = left_padded_batch([30, 21], seed=3)
    modules, off = generate(model, ids, mask, lean=False)
    lean, calls = generate(model, ids, mask, lean=True)
    assert_same(modules, lean)
    assert off == 0
    # every decode step (all but the prompt's forward) ran every layer lean
    assert calls == (STEPS - 1) * model.config.num_hidden_layers


def test_lean_step_equals_transformers_own_generate():
    model = make_model("llama")
    ids, mask = left_padded_batch([26, 26], seed=8)
    with torch.inference_mode():
        own = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False
        )
    lean, calls = generate(model, ids, mask, lean=True)
    assert calls > 0
    assert torch.equal(own, lean.sequences)


def test_gemma3_layers_keep_their_forward():
    model = make_model("gemma3")
    ids, mask = left_padded_batch([30, 21], seed=3)
    modules, _ = generate(model, ids, mask, lean=False)
    lean, calls = generate(model, ids, mask, lean=True)
    assert calls == 0
    assert_same(modules, lean)


@pytest.mark.parametrize(
    "setting",
    [
        {"decode": "quest", "decode_knobs": {"budget": 16}},
        {"decode": "tokenselect", "decode_knobs": {"budget": 12}},
        {"evict": "snapkv", "evict_knobs": {"compression": 0.5}},
        {"evict": "streaming", "evict_knobs": {"sink": 4, "window": 12}},
    ],
    ids=["quest", "tokenselect", "snapkv", "streaming"],
)
def test_lean_step_runs_decode_methods_and_eviction_unchanged(setting):
    model = make_model("qwen2")
    ids, mask = left_padded_batch([40, 33], seed=5)
    modules, _ = generate(model, ids, mask, lean=False, **setting)
    lean, calls = generate(model, ids, mask, lean=True, **setting)
    assert calls == (STEPS - 1) * model.config.num_hidden_layers
    assert_same(modules, lean)


def test_lean_step_composes_with_activation_sparsity(tmp_path):
    """An activation method's stand-ins (teal wraps every projection, cats the MLP) are called
    as modules by the lean step: same tokens and the same channels skipped."""
    model = make_model("llama")
    g = torch.Generator().manual_seed(2)
    inputs = [(f"r{i}", torch.randint(1, 128, (1, 96), generator=g)) for i in range(3)]
    made = activation_profile(model, inputs, model_id="tiny-llama", calibration={"seed": 2})
    path = tmp_path / "act.json"
    save_activation_profile(path, **made)
    ids, mask = left_padded_batch([24, 24], seed=4)
    for name in ("teal", "cats"):
        setting = {"activation": name, "activation_knobs": {"sparsity": 0.5, "profile": str(path)}}
        modules, _ = generate(model, ids, mask, lean=False, **setting)
        lean, calls = generate(model, ids, mask, lean=True, **setting)
        assert calls > 0
        assert_same(modules, lean)


def test_leaving_the_block_restores_every_layer():
    model = make_model("llama")
    layers = list(model.model.layers)
    with sparseattn.sparse_attention(model, min_length=0):
        assert all("forward" in layer.__dict__ for layer in layers)
    assert all("forward" not in layer.__dict__ for layer in layers)
    with sparseattn.sparse_attention(model, min_length=0, lean_decode=False):
        assert all("forward" not in layer.__dict__ for layer in layers)


def test_gradients_take_the_modules():
    """A decode step with autograd on (or a module in training mode) runs the layers' own
    forward: the lean step never builds a graph of its own."""
    model = make_model("llama")
    ids, mask = left_padded_batch([12], seed=1)
    step_mask = torch.cat([mask, mask[:, -1:]], 1)
    logits = []
    for lean in (False, True):
        with (
            torch.enable_grad(),  # other test modules turn autograd off when imported
            sparseattn.sparse_attention(model, min_length=0, lean_decode=lean) as stats,
        ):
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = output_cache(out)
            step = model(
                input_ids=ids[:, -1:], attention_mask=step_mask, **cache_kwargs(model, cache)
            )
            assert step.logits.requires_grad
            assert (stats.counter(COUNTER) or 0) == 0
            logits.append(step.logits.detach())
    assert torch.equal(logits[0], logits[1])

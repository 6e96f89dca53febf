"""SeerAttention: the gate against a token-by-token oracle, its selection rules, dense at the
dense limit and the kernels agreeing through the hook, the trainer (KL down, exact resume),
the gate file (round trip, another model refused by name) and its command."""

from __future__ import annotations

import cmath
import math

import pytest
import torch
from conftest import VOCAB, left_padded_batch, make_model
from test_backends import make_call

import sparseattn
from sparseattn.backends import BlockLayout
from sparseattn.bench.capture import AttentionCall
from sparseattn.bench.seer import (
    CHECKPOINT,
    SeerTrainer,
    SeerTraining,
    call_context,
    tile_max_target,
    train_seer_gates,
)
from sparseattn.bench.seer_gates import write_seer_gates
from sparseattn.compat import cache_kwargs, output_cache
from sparseattn.errors import UsageError
from sparseattn.methods.seer import gate_logits, pool_tiles
from sparseattn.profiles.gates import load_gates, read_header

torch.set_grad_enabled(False)

LENGTH, BLOCK = 128, 16
CALLS = {
    "prefill": {"q_len": 96, "kv_len": 96},
    "chunk": {"q_len": 40, "kv_len": 100},
    "padded": {"q_len": 90, "kv_len": 90, "pad": (0, 35)},
    "window": {"q_len": 80, "kv_len": 80, "window": 30},
}


def random_data(length: int = LENGTH, seed: int = 0):
    """data(i): (1, length) random tokens, from (seed, i)."""

    def data(index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + index)
        return torch.randint(1, VOCAB, (1, length), generator=g)

    return data


def config(**overrides) -> SeerTraining:
    knobs = {"block_size": BLOCK, "gate_dim": 8, "length": LENGTH, "steps": 6, "lr": 0.02}
    return SeerTraining(**{**knobs, **overrides})


def random_gates(hq=4, hkv=2, d=16, dg=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hq, 3 * d, dg, generator=g), torch.randn(hkv, 3 * d, dg, generator=g)


def gate_file(tmp_path, family: str = "llama", name: str = "tiny-llama", **overrides):
    """A gate file for the tiny model of ``family`` (untrained gates, N(0, 0.5))."""
    model = make_model(family)
    trainer = SeerTrainer(model, config(**overrides))
    trainer.q_proj.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    trainer.k_proj.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"{name}.safetensors"
    write_seer_gates(path, trainer, name)
    return model, path


# -- the gate ------------------------------------------------------------------------------


def test_pool_tiles_hand_case():
    x = torch.tensor([1.0, -2.0, 4.0, 3.0, 5.0])[None, None, :, None]  # (1, 1, 5, 1)
    pooled = pool_tiles(x, None, 2)  # tiles [1, -2], [4, 3], [5]
    assert pooled[0, 0].tolist() == [[-0.5, 1.0, -2.0], [3.5, 4.0, 3.0], [5.0, 5.0, 5.0]]
    valid = torch.tensor([[False, True, True, True, False]])  # padding left out of the pools
    pooled = pool_tiles(x, valid, 2)
    assert pooled[0, 0].tolist() == [[-2.0, -2.0, -2.0], [3.5, 4.0, 3.0], [0.0, 0.0, 0.0]]


def oracle_logits(q, k, ctx, b, wq, wk, base):
    """Tile logits computed head by head and tile by tile: pooled valid tokens, the head's
    projection, RoPE as complex rotations, the dot product; -inf where no pair is visible."""
    B, Hq, Lq, D = q.shape
    layout = BlockLayout(ctx, b)
    nQ, nK = layout.n_q_blocks, layout.n_kv_blocks
    dg = wq.shape[-1]
    valid = torch.ones(B, ctx.kv_len, dtype=torch.bool) if ctx.key_valid is None else ctx.key_valid
    own = ctx.q_offset - ctx.kv_offset

    def pooled(x, real):
        if not real.any():
            return torch.zeros(3 * D)
        x = x[real]
        return torch.cat([x.mean(0), x.amax(0), x.amin(0)])

    def rotate(v, pos):
        half = dg // 2
        out = torch.empty(dg)
        for i in range(half):
            z = complex(v[i], v[i + half]) * cmath.exp(1j * pos * base ** (-2 * i / dg))
            out[i], out[i + half] = z.real, z.imag
        return out

    logits = torch.full((B, Hq, nQ, nK), float("-inf"))
    for r in range(B):
        for h in range(Hq):
            kv = h // ctx.groups
            for i in range(nQ):
                rows = slice(i * b, min((i + 1) * b, Lq))
                qv = pooled(q[r, h, rows], valid[r, own + i * b : own + min((i + 1) * b, Lq)])
                qg = rotate(qv @ wq[h], ctx.q_offset + i * b)
                for j in range(nK):
                    if not layout.visible[r, i, j]:
                        continue
                    cols = slice(j * b, min((j + 1) * b, ctx.kv_len))
                    kg = rotate(pooled(k[r, kv, cols], valid[r, cols]) @ wk[kv], j * b)
                    logits[r, h, i, j] = qg @ kg / math.sqrt(dg)
    return logits


@pytest.mark.parametrize("call", CALLS)
def test_gate_logits_match_the_tile_by_tile_oracle(call):
    q, k, _v, ctx = make_call(**CALLS[call], seed=3)
    layout = BlockLayout(ctx, BLOCK)
    wq, wk = random_gates()
    got = gate_logits(q, k, ctx, layout, wq, wk, 10000.0)
    assert got.shape == (2, 4, layout.n_q_blocks, layout.n_kv_blocks)
    assert torch.equal(torch.isinf(got), ~layout.visible[:, None].expand_as(got))
    want = oracle_logits(q, k, ctx, BLOCK, wq, wk, 10000.0)
    seen = torch.isfinite(want)
    torch.testing.assert_close(got[seen], want[seen], atol=1e-4, rtol=1e-4)


def contract_method(**knobs):
    from test_contract import NEEDS

    return sparseattn.build_method("seer", block_size=32, **NEEDS["seer"], **knobs)


@pytest.mark.parametrize("call", ["prefill", "padded"])
def test_threshold_keeps_the_mass_and_topk_the_fraction(call):
    q, k, _v, ctx = make_call(**{**CALLS[call], "q_len": 200, "kv_len": 200}, seed=5)
    layout = BlockLayout(ctx, 32)
    method = contract_method(threshold=0.6)
    probs = torch.softmax(gate_logits(q, k, ctx, layout, *method.weights(ctx, q), 1e4), -1)
    probs = probs.nan_to_num(0.0)
    sel = method.select(q, k, ctx, layout).mask
    kept = (probs * sel).sum(-1)  # (B, H, nQ)
    rows = layout.visible.any(-1)[:, None].expand_as(kept)
    assert (kept[rows] >= 0.6 - 1e-6).all()
    assert sel.sum() < layout.visible[:, None].expand_as(sel).sum(), "the choice is sparse"
    seen = layout.visible.sum(-1)[:, None]  # (B, 1, nQ) visible tiles per query tile
    sel = contract_method(topk=0.5).select(q, k, ctx, layout).mask
    best = torch.ceil(seen * 0.5).clamp_min(1)
    count = sel.sum(-1)
    # the fraction, plus at most the sink and a diagonal over two tiles
    assert ((count >= best) | ~rows).all() and (count <= best + 3).all()
    dense = contract_method(topk=1.0).select(q, k, ctx, layout).mask
    assert torch.equal(dense, layout.visible[:, None].expand_as(dense))


def test_a_sliding_window_layer_keeps_its_window():
    q, k, _v, ctx = make_call(**CALLS["window"], seed=4)
    layout = BlockLayout(ctx, 32)
    sel = contract_method(threshold=0.3).select(q, k, ctx, layout).mask
    assert torch.equal(sel, layout.visible[:, None].expand_as(sel))


def test_gates_auto_need_the_model_and_shipped_gates():
    q, k, _v, ctx = make_call(**CALLS["prefill"])
    method = sparseattn.build_method("seer", block_size=16, threshold=0.5)
    with pytest.raises(UsageError, match="needs the model"):
        method.select(q, k, ctx, BlockLayout(ctx, 16))
    with pytest.raises(UsageError, match=r"no shipped seer gates match llama.*--kind seer"):
        method.bind(make_model("llama").config)


# -- through the hook -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dense_limit_through_the_hook_equals_dense(tmp_path, family):
    model, path = gate_file(tmp_path, family)
    ids, mask = left_padded_batch([150, 97], seed=4)
    expected = model(input_ids=ids, attention_mask=mask).logits
    knobs = {
        "min_length": 0,
        "prefill_backend": "reference",
        "block_size": BLOCK,
        "gates": str(path),
    }
    for limit in ({"threshold": 1.0}, {"topk": 1.0, "threshold": 0.5}):
        with sparseattn.sparse_attention(model, "seer", **knobs, **limit) as stats:
            got = model(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
        assert stats.density("prefill") == pytest.approx(1.0)


@pytest.mark.parametrize("family, backends", [("llama", ("cpp", "flex")), ("gemma3", ("cpp",))])
def test_kernels_agree_on_a_sparse_padded_prefill(tmp_path, family, backends):
    """Left padding, GQA; Gemma 3's sliding layers keep every tile of their window."""
    model, path = gate_file(tmp_path, family)
    ids, mask = left_padded_batch([150, 97], seed=6)
    knobs = {"min_length": 0, "block_size": BLOCK, "gates": str(path), "threshold": 0.5}
    with sparseattn.sparse_attention(model, "seer", prefill_backend="reference", **knobs) as st:
        expected = model(input_ids=ids, attention_mask=mask).logits
    layers = st.layer_density("prefill")
    full = [i for i in layers if family != "gemma3" or i == 2]
    assert all(layers[i] < 0.9 for i in full), layers
    assert all(layers[i] == pytest.approx(1.0) for i in layers if i not in full)
    keep = mask.bool()
    for backend in backends:
        with sparseattn.sparse_attention(model, "seer", prefill_backend=backend, **knobs):
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)


def test_chunked_prefill_runs_sparse_and_the_kernels_agree(tmp_path):
    """A left-padded prompt read in two chunks (the second at offset 90 over 150 keys)."""
    model, path = gate_file(tmp_path)
    ids, mask = left_padded_batch([150, 97], seed=5)
    knobs = {"min_length": 0, "block_size": BLOCK, "gates": str(path), "threshold": 0.5}
    logits = {}
    for backend in ("reference", "cpp"):
        with sparseattn.sparse_attention(model, "seer", prefill_backend=backend, **knobs) as st:
            first = model(input_ids=ids[:, :90], attention_mask=mask[:, :90])
            cache = cache_kwargs(model, output_cache(first))
            second = model(input_ids=ids[:, 90:], attention_mask=mask, **cache)
            assert st.density("prefill") < 0.9
        logits[backend] = torch.cat([first.logits, second.logits], 1)[mask.bool()]
    torch.testing.assert_close(logits["cpp"], logits["reference"], atol=1e-4, rtol=1e-4)


# -- the trainer ----------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"window": 20, "softcap": 5.0}])
def test_tile_max_target_is_the_pooled_attention_map(extra):
    q, k, v, ctx = make_call(70, 70, seed=2)
    call = AttentionCall(0, q, k, v, None, ctx.scaling, extra.get("window"), extra.get("softcap"))
    ctx = call_context(call)
    layout = BlockLayout(ctx, BLOCK)
    got = tile_max_target(q, k, ctx, layout)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * ctx.scaling
    if "softcap" in extra:
        logits = torch.tanh(logits / 5.0) * 5.0
    pos = torch.arange(70)
    seen = pos[None, :] <= pos[:, None]
    if "window" in extra:
        seen &= pos[:, None] - pos[None, :] < 20
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1)
    want = torch.zeros_like(got)
    for i in range(layout.n_q_blocks):
        for j in range(layout.n_kv_blocks):
            want[..., i, j] = probs[
                ..., i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK
            ].amax((-1, -2))
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(got, want)


def test_training_lowers_the_kl():
    """Sharp attention (query and key weights x 6) on one repeated sample: ten steps of the
    trainer take the KL of the gates to the pooled attention below half its first value."""
    model = make_model("llama")
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(6.0)
        layer.self_attn.k_proj.weight.mul_(6.0)
    ids = random_data()(0)
    trainer = train_seer_gates(model, lambda i: ids, config(steps=10, lr=0.01), progress=False)
    first, now = trainer.history[0], float(trainer.loss(ids))
    assert first > 0.01 and now < 0.5 * first, trainer.history
    assert first == pytest.approx(float(SeerTrainer(model, config()).loss(ids)))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_a_model_with_only_sliding_layers_is_refused():
    trainer = SeerTrainer(make_model("mistral"), config())
    with pytest.raises(UsageError, match="no full-attention layer"):
        trainer.loss(random_data()(0))


class Stop(Exception):
    """A hard kill: nothing is saved on the way out."""


def test_resume_gives_the_uninterrupted_run(tmp_path):
    cfg = config(steps=6, checkpoint_every=2)
    whole = train_seer_gates(make_model("gemma3"), random_data(), cfg, progress=False)

    def stop_at_3(trainer):
        if trainer.step == 3:
            raise Stop

    folder = tmp_path / "ck"
    with pytest.raises(Stop):
        train_seer_gates(
            make_model("gemma3"), random_data(), cfg, checkpoint=folder, on_step=stop_at_3
        )
    assert torch.load(folder / CHECKPOINT, weights_only=False)["step"] == 2
    with pytest.raises(UsageError, match="--resume"):
        train_seer_gates(make_model("gemma3"), random_data(), cfg, checkpoint=folder)
    with pytest.raises(UsageError, match="lr=0.02 there, 0.01 now"):
        other = config(steps=6, checkpoint_every=2, lr=0.01)
        train_seer_gates(make_model("gemma3"), random_data(), other, checkpoint=folder, resume=True)
    resumed = train_seer_gates(
        make_model("gemma3"), random_data(), cfg, checkpoint=folder, resume=True, progress=False
    )
    assert resumed.step == whole.step == 6 and resumed.history == whole.history
    assert torch.equal(resumed.q_proj, whole.q_proj) and torch.equal(resumed.k_proj, whole.k_proj)
    assert resumed.sliding_layers == whole.sliding_layers == {0, 1}


# -- the gate file --------------------------------------------------------------------------


def test_gate_file_round_trips_and_refuses_another_model(tmp_path):
    model = make_model("gemma3")
    trainer = train_seer_gates(model, random_data(), config(steps=2), progress=False)
    path = tmp_path / "g.safetensors"
    write_seer_gates(path, trainer, "tiny-gemma3")
    gates = load_gates(str(path))
    assert gates.gate["layers"] == [2] and gates.gate["sliding_layers"] == [0, 1]
    assert gates.training["samples"] == 2 and gates.model["id"] == "tiny-gemma3"
    torch.testing.assert_close(gates.q_proj[0], trainer.q_proj[2], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gates.k_proj[0], trainer.k_proj[2], atol=1e-3, rtol=1e-3)
    method = sparseattn.build_method("seer", block_size=BLOCK, gates=str(path))
    method.bind(model.config)
    other = make_model("llama").config
    other._name_or_path = "tiny-llama"
    with pytest.raises(UsageError, match=r"trained for 'tiny-gemma3'.*model is 'tiny-llama'"):
        method.bind(other)
    with pytest.raises(UsageError, match=r"pool tiles of 16 tokens.*block_size=32"):
        sparseattn.build_method("seer", block_size=32, gates=str(path))
    with pytest.raises(UsageError, match="does not exist"):
        sparseattn.build_method("seer", gates=str(tmp_path / "none.safetensors"))
    torch.save({"x": 1}, tmp_path / "bad.safetensors")
    with pytest.raises(UsageError, match="not a sparseattn gate file"):
        read_header(tmp_path / "bad.safetensors")


def test_profile_command_trains_gates_and_resumes(tmp_path, capsys):
    from sparseattn.cli import main

    out, ck = tmp_path / "tiny.safetensors", tmp_path / "ck"
    args = ["profile", "--model", "tiny-random-llama", "--kind", "seer", "--length", "256"]
    args += ["--block-size", "32", "--gate-dim", "8", "--steps", "2", "--no-progress"]
    args += ["--checkpoint", str(ck)]
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "s per step" in err and "gates:" in err
    assert main([*args, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--resume"]) == 0  # finished: writes the file again
    assert main([*args, "--out", str(tmp_path / "g.json")]) == 2
    assert ".safetensors file" in capsys.readouterr().err
    gates = load_gates(str(out))
    assert gates.model["id"] == "tiny-random-llama" and gates.block_size == 32
    assert gates.training["samples"] == 2 and gates.training["length"] == 256
    assert gates.q_proj.shape == (2, 4, 48, 8)

"""The hook: dense through sparseattn equals the model's own sdpa path; the model is restored."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded_batch, make_model
from transformers import DynamicCache

import sparseattn

torch.set_grad_enabled(False)


def valid_logits(logits, mask):
    return logits[mask.bool()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpp", "flex", "reference"])
def test_dense_prefill_matches_sdpa_batch2_left_padding(family, backend):
    model = make_model(family)
    ids, mask = left_padded_batch([70, 45])
    expected = model(input_ids=ids, attention_mask=mask).logits
    with sparseattn.sparse_attention(model, "dense", min_length=0, prefill_backend=backend):
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(
        valid_logits(got, mask), valid_logits(expected, mask), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_limit_through_flex_matches_sdpa(family):
    """streaming with an unbounded window runs every layer through flex and must equal dense."""
    model = make_model(family)
    ids, mask = left_padded_batch([90, 61], seed=3)
    expected = model(input_ids=ids, attention_mask=mask).logits
    with sparseattn.sparse_attention(
        model, "streaming", sink=0, window=10**6, min_length=0, block_size=16
    ):
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(
        valid_logits(got, mask), valid_logits(expected, mask), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_chunked_prefill_matches_sdpa(family):
    model = make_model(family)
    ids, mask = left_padded_batch([64, 50], seed=1)
    expected = model(input_ids=ids, attention_mask=mask).logits
    with sparseattn.sparse_attention(model, "strided", stride=1, min_length=0, block_size=16):
        cache = DynamicCache(config=model.config)
        first = model(
            input_ids=ids[:, :40],
            attention_mask=mask[:, :40],
            past_key_values=cache,
            use_cache=True,
        )
        second = model(
            input_ids=ids[:, 40:], attention_mask=mask, past_key_values=cache, use_cache=True
        )
    got = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(
        valid_logits(got, mask), valid_logits(expected, mask), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_generate_matches_sdpa(family):
    model = make_model(family)
    ids, mask = left_padded_batch([40, 29], seed=2)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    expected = model.generate(**kwargs)
    with sparseattn.sparse_attention(
        model, "streaming", sink=0, window=10**6, min_length=0, block_size=16
    ):
        got = model.generate(**kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.scores), torch.stack(expected.scores), atol=1e-4, rtol=1e-4
    )
    stats = sparseattn.last_stats(model)
    assert stats.density("prefill") == pytest.approx(1.0)
    assert stats.density("decode") == pytest.approx(1.0)


def test_leaving_the_context_restores_the_model():
    model = make_model("gemma3")
    ids, mask = left_padded_batch([50, 50])
    before = model(input_ids=ids, attention_mask=mask).logits
    names = model.config._attn_implementation
    with sparseattn.sparse_attention(
        model, "streaming", sink=16, window=16, min_length=0, block_size=16
    ):
        sparse = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == names
    assert not torch.allclose(sparse, before, atol=1e-3)  # sparsity really changed the output
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_context_restores_after_an_exception():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with sparseattn.sparse_attention(model, "dense"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_streaming_matches_reference_backend_and_reports_density():
    model = make_model("llama")
    ids, mask = left_padded_batch([128, 128], seed=4)
    knobs = dict(sink=16, window=32, min_length=0, block_size=16)
    with sparseattn.sparse_attention(model, "streaming", prefill_backend="reference", **knobs):
        expected = model(input_ids=ids, attention_mask=mask).logits
    with sparseattn.sparse_attention(model, "streaming", **knobs) as stats:
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # tile rows: query tile i keeps tile 0 (sink) and tiles overlapping [16 i - 31, 16 i + 15]
    n = 8
    kept = sum(min(i + 1, len({0} | set(range(max(0, i - 2), i + 1)))) for i in range(n))
    causal_tiles = n * (n + 1) // 2
    diag_pairs, full_pairs = 16 * 17 // 2, 16 * 16
    expected_density = (n * diag_pairs + (kept - n) * full_pairs) / (
        n * diag_pairs + (causal_tiles - n) * full_pairs
    )
    assert stats.density("prefill") == pytest.approx(expected_density)
    assert set(stats.layer_density("prefill")) == {0, 1}
    assert len(stats.head_density("prefill")[0]) == 4


def test_dense_layers_and_min_length_fall_back_to_dense():
    model = make_model("llama")
    ids, mask = left_padded_batch([128, 128])
    with sparseattn.sparse_attention(
        model, "streaming", sink=16, window=16, block_size=16, min_length=0, dense_layers=[0]
    ) as stats:
        model(input_ids=ids, attention_mask=mask)
    assert stats.layer_density()[0] == 1.0 and stats.layer_density()[1] < 0.6
    with sparseattn.sparse_attention(
        model, "streaming", sink=16, window=16, min_length=129
    ) as stats:
        model(input_ids=ids, attention_mask=mask)
    assert stats.density() == 1.0


def test_two_phase_form_uses_each_method_in_its_phase():
    model = make_model("qwen2")
    ids, mask = left_padded_batch([100, 100])
    with sparseattn.sparse_attention(
        model,
        prefill="dense",
        decode="streaming",
        decode_knobs=dict(sink=16, window=16, block_size=16),
        min_length=0,
    ) as stats:
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert stats.density("prefill") == 1.0
    assert stats.density("decode") < 0.5


def test_dense_method_runs_the_models_own_sdpa_path():
    """A user-built `dense` must take the SDPA fast path (no selection, no flex/gather copy)."""
    model = make_model("llama")
    ids, mask = left_padded_batch([64, 64])
    with sparseattn.sparse_attention(model, "dense", min_length=0, timing=True) as stats:
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert stats.seconds("prefill")["select_s"] == 0.0 < stats.seconds("prefill")["attend_s"]
    assert stats.seconds("decode")["select_s"] == 0.0 < stats.seconds("decode")["attend_s"]
    assert set(stats.layer_methods("decode").values()) == {"dense"}


def test_timers_run_only_when_asked():
    model = make_model("llama")
    ids, mask = left_padded_batch([64, 64])
    with sparseattn.sparse_attention(model, "streaming", window=16, block_size=16, min_length=0):
        model(input_ids=ids, attention_mask=mask)
    assert sparseattn.last_stats(model).seconds("prefill") == {"select_s": 0.0, "attend_s": 0.0}


def test_non_causal_mask_functions_are_refused_by_name():
    """transformers hands the mask function over; a bidirectional (or packed) one must not
    silently become causal."""
    model = make_model("llama")
    ids = torch.randint(1, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    model.config.is_causal = False
    try:
        with sparseattn.sparse_attention(model, "dense", min_length=0):
            with pytest.raises(ValueError, match="bidirectional_mask_function.*not causal"):
                model(input_ids=ids, use_cache=False)
    finally:
        del model.config.is_causal
    packed = torch.cat([torch.arange(16), torch.arange(16)])[None]  # two sequences in one row
    with sparseattn.sparse_attention(model, "dense", min_length=0):
        with pytest.raises(ValueError, match="not causal"):
            model(input_ids=ids, position_ids=packed, use_cache=False)


def test_sliding_window_mask_function_is_accepted():
    from transformers.masking_utils import sliding_window_causal_mask_function

    from sparseattn.integration.hf import check_mask_function

    check_mask_function(sliding_window_causal_mask_function(8), 2, 0, 40, 8, "cpu")
    with pytest.raises(ValueError, match="sliding window of 16"):
        check_mask_function(sliding_window_causal_mask_function(8), 2, 0, 40, 16, "cpu")


def test_layouts_are_not_shared_across_devices():
    from sparseattn.integration.options import HookOptions
    from sparseattn.integration.plan import SparsePlan
    from sparseattn.integration.stats import RunStats
    from sparseattn.methods.static import Dense
    from sparseattn.types import AttentionContext, Phase

    plan = SparsePlan(make_model("llama"), Dense(), Dense(), None, HookOptions(), RunStats())
    common = dict(layer_idx=0, phase=Phase.PREFILL, batch=1, q_len=64, kv_len=64, q_offset=0)
    common.update(kv_offset=0, num_q_heads=4, num_kv_heads=2, scaling=0.25)
    on_cpu = plan.layout_for(AttentionContext(**common, device=torch.device("cpu")), 32)
    on_meta = plan.layout_for(AttentionContext(**common, device=torch.device("meta")), 32)
    assert on_cpu.ctx.device.type == "cpu" and on_meta.ctx.device.type == "meta"


def test_layer_stats_name_every_method_a_layer_ran():
    """A layer that ran dense for a short call and sparse for a long one reports both."""
    model = make_model("llama")
    short, long_ = left_padded_batch([40, 40]), left_padded_batch([128, 128], seed=1)
    with sparseattn.sparse_attention(
        model, "streaming", sink=16, window=16, block_size=16, min_length=64
    ) as stats:
        model(input_ids=long_[0], attention_mask=long_[1])  # sparse prefill
        cache = sparseattn.SparseCache(model)
        model(input_ids=short[0], attention_mask=short[1], past_key_values=cache)  # dense: short
        step = torch.cat([short[1], torch.ones_like(short[1][:, :1])], 1)
        model(input_ids=short[0][:, :1], attention_mask=step, past_key_values=cache)
    # the second prompt started a new run: its prefill was dense
    assert stats.layer_methods("prefill") == {0: "dense", 1: "dense"}
    stats.record(0, sparseattn.Phase.DECODE, "streaming", torch.ones(2, 4), torch.ones(2, 4))
    assert stats.layer_methods("decode")[0] in ("dense+streaming", "streaming+dense")


def test_attention_without_mask_over_a_foreign_cache_is_refused():
    """Without a mask the query positions over a cache that is not ours are unknown (a static
    cache holds more slots than tokens): refuse rather than guess."""
    from sparseattn.integration.hf import sparse_attention_forward

    model = make_model("llama")
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 64, 16)
    with sparseattn.sparse_attention(model, "dense", min_length=0):
        with pytest.raises(ValueError, match="query positions are unknown"):
            sparse_attention_forward(attn, q, k, k, None)


def test_mask_function_takes_the_cache_position_of_transformers_before_5_24():
    from transformers.masking_utils import causal_mask_function

    from sparseattn.integration.hf import sparse_mask

    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    common = dict(batch_size=2, kv_length=8, kv_offset=0, mask_function=causal_mask_function)
    new = sparse_mask(q_length=3, q_offset=5, attention_mask=padding, **common)
    old = sparse_mask(cache_position=torch.arange(5, 8), attention_mask=padding, **common)
    assert (old.q_offset, old.kv_offset, old.local_size) == (new.q_offset, new.kv_offset, None)
    assert old.q_offset == 5 and torch.equal(old.padding, new.padding)

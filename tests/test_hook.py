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
@pytest.mark.parametrize("backend", ["flex", "reference"])
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
    with sparseattn.sparse_attention(model, "dense", min_length=0) as stats:
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert stats.seconds("prefill")["select_s"] == 0.0
    assert stats.seconds("decode")["select_s"] == 0.0

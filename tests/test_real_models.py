"""Real built-in models (minutes on CPU; run with `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch

import sparseattn

pytestmark = pytest.mark.slow
torch.set_grad_enabled(False)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_dense_hook_matches_sdpa_on_real_model(name):
    model, tok = sparseattn.load_model(name)
    text = "The archive lists every ship that entered the harbour in spring. " * 120
    ids = tok(text, return_tensors="pt").input_ids[:, :1200]
    expected = model(input_ids=ids, logits_to_keep=64).logits
    with sparseattn.sparse_attention(model, "dense", min_length=0) as stats:
        got = model(input_ids=ids, logits_to_keep=64).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
    assert stats.density() == pytest.approx(1.0)


def test_streaming_keeps_smollm2_answer_on_short_needle():
    model, tok = sparseattn.load_model("smollm2-135m")
    prompt = (
        "Remember: the code word is PELICAN. "
        + "Nothing else matters here. " * 400
        + "What is the code word?"
    )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with sparseattn.sparse_attention(
        model, "streaming", sink=128, window=256, min_length=0
    ) as stats:
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    assert stats.density("prefill") < 0.8
    assert "PELICAN" in tok.decode(out[0, ids.shape[1] :]).upper()

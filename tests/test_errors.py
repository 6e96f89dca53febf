"""Bad input gets a ValueError naming the bad value and the allowed ones."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from torch import nn

import sparseattn


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*streaming"):
        sparseattn.build_method("nope")


def test_unknown_knob_lists_allowed_knobs():
    with pytest.raises(ValueError, match=r"unknown knob\(s\) 'windw'.*window"):
        sparseattn.build_method("streaming", windw=3)


@pytest.mark.parametrize(
    "name, knobs, pattern",
    [
        ("streaming", {"window": 0}, r"window=0 is out of range; allowed: \[1,"),
        ("oracle", {"top_p": 1.5}, r"top_p=1.5 is out of range; allowed: \[0.01, 1.0\]"),
        (
            "dense",
            {"block_size": 100},
            r"block_size=100 is not allowed; choose one of \[16, 32, 64, 128, 256\]",
        ),
        ("strided", {"stride": "4"}, r"stride='4' must be a number"),
    ],
)
def test_out_of_range_knob(name, knobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sparseattn.build_method(name, **knobs)


def test_unknown_knob_through_the_context_manager_leaves_model_untouched():
    model = make_model("llama")
    with pytest.raises(ValueError, match="unknown knob"):
        with sparseattn.sparse_attention(model, "streaming", nope=1):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_names_missing_attention_layers():
    class OldAttention(nn.Module):
        def forward(self, x):
            return x

    class OldModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = OldAttention()

    with pytest.raises(ValueError, match=r"unsupported model OldModel.*self_attn \(OldAttention\)"):
        with sparseattn.sparse_attention(OldModel(), "dense"):
            pass


def test_unknown_builtin_model_lists_builtins():
    with pytest.raises(ValueError, match=r"unknown model 'smollm3'.*gemma3-270m, smollm2-135m"):
        sparseattn.load_model("smollm3")


def test_missing_gguf_file():
    with pytest.raises(ValueError, match="GGUF file not found"):
        sparseattn.load_model("/nowhere/model.gguf")


def test_uncached_hub_id_is_not_downloaded():
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        sparseattn.load_model("someone/not-a-cached-model-xyz")


def test_bad_backend_and_dense_layers():
    model = make_model("llama")
    with pytest.raises(
        ValueError, match=r"prefill_backend='cuda'; allowed: \['auto', 'cpp', 'flex', 'reference'\]"
    ):
        with sparseattn.sparse_attention(model, "dense", prefill_backend="cuda"):
            pass
    with pytest.raises(
        ValueError, match=r"dense_layers \[5\] out of range; the model has layers 0..1"
    ):
        with sparseattn.sparse_attention(model, "dense", dense_layers=[5]):
            pass


def test_nesting_is_refused():
    model = make_model("llama")
    with sparseattn.sparse_attention(model, "dense"):
        with pytest.raises(ValueError, match="already inside"):
            with sparseattn.sparse_attention(model, "dense"):
                pass


def test_hook_outside_context_is_a_clear_error():
    from sparseattn.integration.hf import sparse_attention_forward

    model = make_model("llama")
    layer = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="outside a `with sparseattn.sparse_attention"):
        sparse_attention_forward(layer, q, q[:, :2], q[:, :2], None)

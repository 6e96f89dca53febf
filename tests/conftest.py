"""Tiny random-weight models of every supported family: no download, seconds to run."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (pytest -n): one thread each
    torch.set_num_threads(1)

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
WINDOW = 24  # model-level sliding window, small so tests exercise it


@pytest.fixture(autouse=True)
def fixed_crossover():
    """min_length="auto" resolves to 1024 in every test: tests never depend on timing (a test
    of the crossover itself injects its own measurement)."""
    from sparseattn.integration.crossover import measured_by

    with measured_by(lambda key: 1024):
        yield


@pytest.fixture
def selection_over_every_key(monkeypatch):
    """Decode methods whose budget covers the cache select every key instead of returning None
    (dense): their selection and gather path runs, and a test can check it equals dense."""
    from sparseattn.methods.base import Method

    monkeypatch.setattr(Method, "dense_when_covered", False)


def covering_budget(ids: torch.Tensor, steps: int, page: int = 1) -> int:
    """The smallest budget (in whole pages of ``page`` tokens) that covers the cache at every
    decode step of ``generate(..., max_new_tokens=steps)``: the key length of its last step."""
    last = ids.shape[1] + steps - 1
    return -(-last // page) * page


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "qwen2":
        return Qwen2Config(
            **COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        )
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=WINDOW)
    if family == "gemma3":
        return Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3},
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    return model.float().eval()


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    return make_model(request.param)


def left_padded_batch(lengths: list[int], seed: int = 0, pad_id: int = 0):
    """input_ids and attention_mask for a left-padded batch of random tokens."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask

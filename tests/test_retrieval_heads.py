"""Retrieval-head profiling: the scoring rule on hand-built rows, and a model built to copy."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sparseattn.bench.calibrate import write_profile
from sparseattn.bench.retrieval_heads import (
    NeedlePrompt,
    find_span,
    retrieval_profile,
    retrieval_scores,
    score_rows,
)
from sparseattn.errors import UsageError
from sparseattn.profiles import load_profile

# -- the scoring rule on hand-built attention rows -------------------------------------------


def test_hit_needs_the_argmax_inside_the_needle_on_the_copied_token():
    ids = torch.tensor([5, 6, 7, 8, 9, 7])  # needle = positions 1..3 (tokens 6, 7, 8)
    span = (1, 4)
    targets = torch.tensor([6, 7, 8])
    copying = torch.ones(3, dtype=torch.bool)
    rows = torch.zeros(4, 3, 6)
    rows[0, 0, 1] = rows[0, 1, 2] = rows[0, 2, 3] = 1.0  # head 0 follows the needle: 3 hits
    rows[1, 0, 1] = rows[1, 1, 5] = rows[1, 2, 0] = 1.0  # head 1: token 7 outside the needle
    rows[2, :, 2] = 1.0  # head 2 always on token 7: a hit at step 1 only
    rows[3, 0, 2] = rows[3, 1, 1] = rows[3, 2, 2] = 1.0  # inside the needle, wrong tokens
    hits, steps = score_rows(rows, ids, span, targets, copying)
    assert hits.tolist() == [3, 1, 1, 0]
    assert steps == 3


def test_steps_where_the_model_does_not_copy_are_skipped():
    ids = torch.tensor([1, 2, 3, 4])
    rows = torch.zeros(1, 3, 4)
    rows[0, torch.arange(3), torch.tensor([1, 2, 3])] = 1.0  # always on the right token
    copying = torch.tensor([True, False, True])
    hits, steps = score_rows(rows, ids, (1, 4), torch.tensor([2, 3, 4]), copying)
    assert hits.tolist() == [2] and steps == 2  # the skipped step is neither hit nor miss


def test_a_repeated_needle_token_is_a_hit_at_either_occurrence():
    ids = torch.tensor([9, 4, 0, 4, 9])  # needle 4 0 4 at positions 1..3
    targets = torch.tensor([4, 0, 4])
    rows = torch.zeros(2, 3, 5)
    rows[0, 0, 3] = rows[0, 1, 2] = rows[0, 2, 1] = 1.0  # the other occurrence of 4: still hits
    rows[1, :, 0] = 1.0
    hits, _ = score_rows(rows, ids, (1, 4), targets, torch.ones(3, dtype=torch.bool))
    assert hits.tolist() == [3, 0]


def test_find_span_wants_exactly_one_occurrence():
    assert find_span([1, 2, 3, 2, 3], [3, 2]) == (2, 4)
    assert find_span([1, 2, 3, 2, 3], [2, 3]) is None  # twice
    assert find_span([1, 2], [4]) is None


# -- a constructed model whose one head copies ----------------------------------------------

BOS, CUE, NEEDLE, FILLER = 0, 1, list(range(2, 8)), list(range(8, 16))
CONST, TOKEN, PREV, COPY = 0, 1, 17, 33  # residual layout: constant, token, previous token, copy
COPY_LAYER, COPY_HEAD = 1, 2


def copying_llama() -> torch.nn.Module:
    """A 2-layer Llama with hand-set weights: layer 0 head 0 attends to the previous token and
    writes its identity; layer 1 head 2 is an induction head (matches its own token against
    the previous-token codes, copies the token after the match into the logits).

    Previous-token attention uses RoPE's 8 fastest channel pairs (q = k rotated back by one
    position); the induction match uses the 8 slowest pairs, where rotation over 100 tokens is
    below 0.1 rad. MLPs are zero; other heads have zero queries (uniform attention) and write
    nothing.
    """
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=None,
        pad_token_id=BOS,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    for norm in [model.model.norm] + [
        n
        for layer in model.model.layers
        for n in (layer.input_layernorm, layer.post_attention_layernorm)
    ]:
        torch.nn.init.ones_(norm.weight)
    emb = model.model.embed_tokens.weight  # (V, hidden)
    with torch.no_grad():
        emb[:, CONST] = 1.0
        emb[torch.arange(16), TOKEN + torch.arange(16)] = 1.0
        inv_freq = model.model.rotary_emb.inv_freq  # (32,)
        prev = model.model.layers[0].self_attn
        for i in range(8):  # fastest pairs (i, i + 32): q = k rotated by -theta_i
            theta = float(inv_freq[i])
            prev.q_proj.weight[i, CONST] = 6.0 * math.cos(theta)
            prev.q_proj.weight[i + 32, CONST] = -6.0 * math.sin(theta)
            prev.k_proj.weight[i, CONST] = 1.0
        for c in range(16):
            prev.v_proj.weight[c, TOKEN + c] = 1.0  # kv head 0 carries the token
            prev.o_proj.weight[PREV + c, c] = 0.2  # head 0 writes it as "previous token"
        ind = model.model.layers[COPY_LAYER].self_attn
        for c in range(16):
            channel = 24 + c if c < 8 else 56 + (c - 8)  # slowest pairs (24..31, 56..63)
            ind.q_proj.weight[COPY_HEAD * 64 + channel, TOKEN + c] = 6.0  # query: own token
            ind.k_proj.weight[64 + channel, PREV + c] = 1.0  # key (kv head 1): previous token
            ind.v_proj.weight[64 + c, TOKEN + c] = 1.0  # value: the token itself
            ind.o_proj.weight[COPY + c, COPY_HEAD * 64 + c] = 1.0
            model.lm_head.weight[c, COPY + c] = 4.0
    return model


def needle_prompt(seed: int, length: int = 96) -> NeedlePrompt:
    g = torch.Generator().manual_seed(seed)
    filler = torch.tensor(FILLER)[torch.randint(0, len(FILLER), (length,), generator=g)].tolist()
    needle = torch.tensor(NEEDLE)[torch.randperm(len(NEEDLE), generator=g)].tolist()
    at = int(torch.randint(8, length - 24, (1,), generator=g))
    ids = [BOS] + filler[:at] + [CUE] + needle + filler[at:] + [CUE]
    start = 1 + at + 1
    return NeedlePrompt(ids, (start, start + len(needle)), f"copy#{seed}")


def test_the_constructed_model_copies_the_needle():
    """Oracle: transformers' own greedy generate reproduces the needle after the cue."""
    model = copying_llama()
    prompt = needle_prompt(0)
    out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=6, do_sample=False)
    start, end = prompt.span
    assert out[0, len(prompt.ids) :].tolist() == prompt.ids[start:end]


def test_profiler_finds_the_one_copying_head(tmp_path):
    model = copying_llama()
    prompts = [needle_prompt(seed) for seed in range(4)]
    scores, copies, seen = retrieval_scores(model, prompts)
    assert seen == 4 and copies == 4 * len(NEEDLE)  # it copies at every step
    assert scores[COPY_LAYER, COPY_HEAD] == 1.0
    others = scores.clone()
    others[COPY_LAYER, COPY_HEAD] = 0.0
    assert others.max() == 0.0  # no other head points into the needle

    profile = retrieval_profile(
        model, None, model_id="copying-llama", lengths=[97], samples=4, prompts=prompts
    )
    path = tmp_path / "copy-retrieval.json"
    write_profile(str(path), profile)
    loaded = load_profile(str(path), "retrieval")
    assert loaded.levels == (0.0,)
    assert loaded.heads[0.0][COPY_LAYER][COPY_HEAD] == 1.0
    assert loaded.summary[0.0]["heads>=0.1"] == [0, 1]
    assert loaded.summary[0.0]["max"] == [0.0, 1.0]
    assert loaded.calibration["copied_tokens"] == 24
    loaded.check_model(model.config)
    other = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, head_dim=64, hidden_size=64)
    with pytest.raises(
        UsageError, match="made for copying-llama: llama \\(2 layers.*model is llama \\(3"
    ):
        loaded.check_model(other)


def test_a_model_that_never_copies_is_a_clear_error():
    model = copying_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit equal: the top prediction is token 0
    with pytest.raises(UsageError, match="copied no needle token in 2 prompts"):
        retrieval_scores(model, [needle_prompt(0), needle_prompt(1)])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_answer_argmax_equals_the_models_own_attention_weights(family):
    """Oracle: the argmax of transformers' eager attention probabilities of the answer rows
    (Gemma 3's sliding layers included)."""
    from conftest import make_model

    from sparseattn.bench.retrieval_heads import answer_pass

    model = make_model(family)
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(2))
    argmax, logits = answer_pass(model, ids, 5)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_attentions=True)
    assert torch.allclose(logits, out.logits[0, -5:], atol=1e-5)
    for layer, probs in enumerate(out.attentions):  # (1, Hq, L, L)
        assert torch.equal(argmax[layer], probs[0, :, -5:].argmax(-1)), layer

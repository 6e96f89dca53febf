"""The cache that forgets: equal to DynamicCache at capacity, equal to a masked oracle when it
evicts, sizes by the policy's arithmetic, no host sync per decode step, clean state per call."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded_batch, make_model
from syncs import decode_steps
from transformers import DynamicCache, LlamaConfig

import sparseattn
from sparseattn.cache import KVLayer, RingLayer, SparseCache
from sparseattn.methods.eviction import EvictionPolicy
from sparseattn.types import EMPTY_POSITION

torch.set_grad_enabled(False)


def generate(model, ids, mask, steps=8, **extra):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        **extra,
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "setting",
    [
        dict(method="dense"),
        dict(evict="streaming", evict_knobs={"sink": 4, "window": 10_000}),
        dict(method="streaming", sink=0, window=10**6, block_size=16),
    ],
    ids=["dense", "evict-at-capacity", "decode-pages-at-capacity"],
)
def test_capacity_covers_length_equals_transformers_generate(
    family, setting, selection_over_every_key
):
    """A cache and a selection that cover every token decode exactly as transformers does (the
    page selection runs over every page rather than falling back to dense SDPA)."""
    model = make_model(family)
    ids, mask = left_padded_batch([40, 29], seed=2)
    expected = generate(model, ids, mask)
    with sparseattn.sparse_attention(model, min_length=0, **setting):
        got = generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )
    assert all(isinstance(layer, KVLayer) for layer in got.past_key_values.layers)


def kept_positions_mask(total: int, lengths: list[int], sink: int, window: int) -> torch.Tensor:
    """(B, total) bool: the positions a streaming cache keeps after ``total`` tokens (oracle)."""
    width = max(lengths)
    keep = torch.zeros(len(lengths), total, dtype=torch.bool)
    for row, n in enumerate(lengths):
        first = width - n  # left padding
        valid = list(range(first, total))
        for p in valid[:sink] + valid[sink:][-window:]:
            keep[row, p] = True
    return keep


def oracle_decode_logits(model, ids, mask, new_tokens, sink, window):
    """Dense transformers (sdpa) run step by step with a 4-D mask hiding what streaming evicts.

    The prompt is attended densely; each generated token sees only the sink and window kept
    at its step (the model's sliding layers keep their own window on top).
    """
    cache = DynamicCache(config=model.config)
    prompt_positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate does
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=prompt_positions,
        past_key_values=cache,
        use_cache=True,
    )
    logits = []
    full_mask = mask
    lengths = mask.sum(-1).tolist()
    for token in new_tokens.T:
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
        total = full_mask.shape[1]
        lengths = [n + 1 for n in lengths]
        keep = kept_positions_mask(total, lengths, sink, window)  # (B, total)
        additive = torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, float("-inf"))
        four_d = additive[:, None, None, :]
        masks = four_d
        if (
            getattr(model.config, "layer_types", None)
            and "sliding_attention" in model.config.layer_types
        ):
            # sliding layers hold their last W tokens (a DynamicCache keeps exactly those)
            recent = full_mask[:, -model.config.sliding_window :].bool()
            sliding = torch.zeros(recent.shape).masked_fill(~recent, float("-inf"))
            masks = {"full_attention": four_d, "sliding_attention": sliding[:, None, None, :]}
        position = full_mask.sum(-1, keepdim=True) - 1
        out = model(
            input_ids=token[:, None],
            attention_mask=masks,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
        )
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_evicted_cache_equals_masked_oracle(family):
    """Attention over an evicted cache = dense attention over the kept keys at their positions."""
    model = make_model(family)
    model.config._attn_implementation = "sdpa"
    ids, mask = left_padded_batch([30, 19], seed=4)
    sink, window = 3, 8
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": sink, "window": window}, min_length=0
    ):
        got = generate(model, ids, mask, steps=10)
    new_tokens = got.sequences[:, ids.shape[1] :]
    expected = oracle_decode_logits(model, ids, mask, new_tokens[:, :-1], sink, window)
    torch.testing.assert_close(torch.stack(got.logits[1:], 1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_sizes_follow_streaming_arithmetic(family):
    model = make_model(family)
    ids, mask = left_padded_batch([50, 33], seed=5)
    sink, window, steps = 4, 12, 7
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": sink, "window": window}
    ) as stats:
        cache = SparseCache(model)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        after_prefill = [layer.held_tokens() for layer in cache.layers]
        running = mask
        token = ids[:, -1:]
        for _ in range(steps):
            running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
            model(input_ids=token, attention_mask=running, past_key_values=cache, use_cache=True)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, held in zip(cache.layers, after_prefill):
        if layer.is_sliding:
            assert layer.width == config.sliding_window
            continue
        assert layer.width == sink + window
        # the padded row keeps sink + window of its 33 valid tokens, never a pad
        positions = layer.positions[:, 0, : layer.width]
        assert positions.max() < EMPTY_POSITION
        assert (positions[1] >= 50 - 33).all()
        assert layer.seen == 50 + steps
        kept = sorted(positions[0].tolist())
        assert kept == list(range(sink)) + list(range(50 + steps - window, 50 + steps))
        capacity = -(-(sink + window) // 16) * 16
        assert layer.kv_nbytes() == 2 * 2 * config.num_key_value_heads * capacity * head_dim * 4
    assert stats.kv_bytes() == cache.nbytes()


def test_full_cache_bytes_hold_what_dynamic_cache_holds():
    model = make_model("llama")
    ids, mask = left_padded_batch([40, 40], seed=1)
    with sparseattn.sparse_attention(model):
        cache = SparseCache(model)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    dynamic = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, past_key_values=dynamic, use_cache=True)
    for ours, theirs in zip(cache.layers, dynamic.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "setting",
    [
        dict(method="dense"),
        dict(evict="streaming", evict_knobs={"sink": 4, "window": 16}),
        dict(method="streaming", sink=4, window=16, block_size=16),
        dict(method="strided", stride=2, sink=4, window=16, block_size=16),
    ],
    ids=["dense", "evict-streaming", "decode-streaming", "decode-strided"],
)
def test_no_host_sync_per_decode_step(family, setting):
    model = make_model(family)
    ids, mask = left_padded_batch([60, 41], seed=6)
    with sparseattn.sparse_attention(model, min_length=0, **setting):
        run = decode_steps(model, ids, mask)
    assert run.syncs == [[]] * 4


def test_second_generate_starts_clean():
    model = make_model("llama")
    ids, mask = left_padded_batch([40, 29], seed=7)
    other, other_mask = left_padded_batch([35, 35], seed=8)
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": 4, "window": 10}, min_length=0
    ):
        first = generate(model, ids, mask)
        generate(model, other, other_mask)
        again = generate(model, ids, mask)
    assert torch.equal(first.sequences, again.sequences)
    assert first.past_key_values is not again.past_key_values


def test_user_dynamic_cache_is_filled_not_bypassed():
    model = make_model("llama")
    ids, mask = left_padded_batch([30, 30], seed=9)
    cache = DynamicCache(config=model.config)
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": 2, "window": 8}
    ):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 30
    assert all(isinstance(layer, KVLayer) and layer.width == 10 for layer in cache.layers)


def test_prefilled_cache_is_adopted_by_a_policy_without_queries():
    """A cache prefilled densely, then decoded under streaming eviction, is compacted first."""
    model = make_model("llama")
    ids, mask = left_padded_batch([40, 40], seed=10)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    running = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": 2, "window": 8}
    ):
        model(input_ids=token, attention_mask=running, past_key_values=cache, use_cache=True)
    assert all(layer.width == 10 and layer.seen == 41 for layer in cache.layers)


def test_static_cache_is_refused_by_name_when_the_setting_needs_ours():
    from transformers import StaticCache

    model = make_model("llama")
    ids, mask = left_padded_batch([20, 20], seed=11)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with sparseattn.sparse_attention(model, evict="streaming"):
        with pytest.raises(ValueError, match="StaticCache"):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


def test_static_cache_is_used_as_is_when_nothing_needs_ours():
    from transformers import StaticCache

    model = make_model("llama")
    ids, mask = left_padded_batch([20, 14], seed=12)
    expected_cache = StaticCache(config=model.config, max_cache_len=64)
    expected = model(input_ids=ids, attention_mask=mask, past_key_values=expected_cache).logits
    cache = StaticCache(config=model.config, max_cache_len=64)
    with sparseattn.sparse_attention(model, "dense", min_length=0):
        got = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        token = got[:, -1:].argmax(-1)
        got_step = model(input_ids=token, attention_mask=step_mask, past_key_values=cache).logits
    expected_step = model(
        input_ids=token, attention_mask=step_mask, past_key_values=expected_cache
    ).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_step, expected_step, atol=1e-4, rtol=1e-4)


def one_layer_llama():
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


@pytest.mark.parametrize("prompt", [12, 5])  # longer than sink + window (compacted), shorter
def test_rerotate_places_kept_tokens_consecutively(prompt):
    """With one layer, K and V depend only on the token and its rotation: a step over a
    re-rotated streaming cache equals a dense run over [sink tokens + window tokens] at
    consecutive positions, whatever the absolute position reached, whether the ring started
    from a compacted prompt or filled up by decode steps."""
    model = one_layer_llama()
    sink, window = 3, 6
    tokens = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with sparseattn.sparse_attention(
        model,
        evict="streaming",
        evict_knobs={"sink": sink, "window": window, "rerotate": True},
        min_length=0,
    ):
        cache = SparseCache(model)
        model(input_ids=tokens[:, :prompt], past_key_values=cache, use_cache=True)
        for t in range(prompt, 39):
            got = model(input_ids=tokens[:, t : t + 1], past_key_values=cache).logits[:, -1]
    kept = torch.cat([tokens[:, :sink], tokens[:, 39 - window : 39]], 1)
    expected = model(input_ids=kept).logits[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": sink, "window": window}, min_length=0
    ):
        cache = SparseCache(model)
        model(input_ids=tokens[:, :prompt], past_key_values=cache, use_cache=True)
        for t in range(prompt, 39):
            original = model(input_ids=tokens[:, t : t + 1], past_key_values=cache).logits[:, -1]
    assert not torch.allclose(original, expected, atol=1e-3)  # without it the offsets differ


def test_ring_layer_rejects_bad_window():
    with pytest.raises(ValueError, match="window=0"):
        RingLayer(window=0)


class KeepPerHead(EvictionPolicy):
    """Test policy: KV head 0 keeps every other prompt token, head 1 only the last 10: heads
    hold different counts (empty slots, no placeholder keys)."""

    name = "test_keep_per_head"
    needs_queries = True

    def after_prefill(self, layer, query, ctx):
        length = ctx.kv_len
        every_other = torch.arange(0, length, 2)
        last = torch.arange(length - 10, length)
        width = len(every_other)
        slots = torch.zeros(ctx.batch, ctx.num_kv_heads, width, dtype=torch.long)
        valid = torch.zeros_like(slots, dtype=torch.bool)
        slots[:, 0], valid[:, 0] = every_other, True
        slots[:, 1, :10], valid[:, 1, :10] = last, True
        layer.retain(slots, valid)

    @staticmethod
    def kept(length: int, head: int) -> set[int]:
        return set(range(0, length, 2)) if head == 0 else set(range(length - 10, length))


def test_per_head_retention_frees_memory_and_equals_a_per_head_mask():
    model = make_model("llama")
    model.config._attn_implementation = "sdpa"
    ids, mask = left_padded_batch([60, 47], seed=13)
    policy = KeepPerHead()
    with sparseattn.sparse_attention(model, evict=policy, min_length=0):
        cache = SparseCache(model)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        layer = cache.layers[0]
        held = layer.held_tokens()
        # row 1 is padded for 13 slots: those are never kept
        assert held[0].tolist() == [30, 10] and held[1].tolist() == [30 - 7, 10]
        assert layer.width == 30 and layer.kv_nbytes() < dynamic_layer_bytes(ids, model) / 1.5
        tokens, logits, running = [], [], mask
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(5):
            tokens.append(token)
            running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
            out = model(input_ids=token, attention_mask=running, past_key_values=cache)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    # oracle: dense transformers with a (B, Hq, 1, total) mask of what each KV head kept
    dense = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=dense)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    running = mask
    for step, token in enumerate(tokens):
        running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
        total = running.shape[1]
        keep = torch.zeros(2, model.config.num_attention_heads, 1, total, dtype=torch.bool)
        for h in range(keep.shape[1]):
            for p in KeepPerHead.kept(60, h // groups) | set(range(60, total)):
                keep[:, h, 0, p] = True
        keep &= running.bool()[:, None, None, :]
        additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        out = model(
            input_ids=token,
            attention_mask=additive,
            position_ids=running.sum(-1, keepdim=True) - 1,
            past_key_values=dense,
        )
        torch.testing.assert_close(logits[step], out.logits[:, -1], atol=1e-4, rtol=1e-4)


def dynamic_layer_bytes(ids, model) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * ids.shape[0] * config.num_key_value_heads * ids.shape[1] * head_dim * 4


@pytest.mark.parametrize("window", [None, 4])
def test_mask_sizes_take_the_query_length_or_the_cache_position_before_5_24(window):
    # transformers < 5.24 hand get_mask_sizes the call's cache_position (the query positions)
    # and name get_max_length get_max_cache_shape; both forms must give the same sizes.
    layer = RingLayer(window=window, sink=2, page_size=4) if window else KVLayer(page_size=4)
    for _ in range(10):
        layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    positions = torch.arange(layer.seen, layer.seen + 3)
    assert layer.get_mask_sizes(positions) == layer.get_mask_sizes(3)
    assert layer.get_mask_sizes(3) == ((6 if window else 10) + 3, 4 if window else 0)
    assert layer.get_max_cache_shape() == layer.get_max_length() == (6 if window else -1)


def test_a_first_prompt_into_a_bounded_layer_is_attended_as_contiguous_keys(monkeypatch):
    """The prompt a ring layer will compact still sits at positions 0..n-1 while it is attended:
    the call runs as causal SDPA (or tiles), never as a masked product over explicit positions;
    the layer then keeps its sink + window, and the prompt's logits equal the dense model's."""
    from sparseattn.integration import prefill

    seen = []
    original = prefill.dense_prefill
    monkeypatch.setattr(
        prefill,
        "dense_prefill",
        lambda q, k, v, ctx: seen.append(ctx.contiguous) or original(q, k, v, ctx),
    )
    model = make_model("llama")
    ids, mask = left_padded_batch([50, 50], seed=3)
    expected = model(input_ids=ids).logits
    with sparseattn.sparse_attention(
        model, evict="streaming", evict_knobs={"sink": 4, "window": 12}, min_length=0
    ):
        cache = SparseCache(model)
        got = model(input_ids=ids, past_key_values=cache).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert seen and all(seen)
    assert all(layer.width == 16 and layer.positions is not None for layer in cache.layers)

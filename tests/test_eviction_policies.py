"""SnapKV, PyramidKV and AdaKV: held tokens follow each policy's arithmetic per layer and head,
the kept set is the top of attention scores computed by hand, a budget covering the prompt
equals dense generate, padding is never kept, decode over the kept set equals a masked dense
model, no host sync per decode step, bad knobs named."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch
from conftest import WINDOW, left_padded_batch, make_model, tiny_config
from syncs import decode_steps
from test_cache import generate
from transformers import AutoModelForCausalLM, DynamicCache

import sparseattn
from sparseattn.cache import SparseCache
from sparseattn.errors import UsageError
from sparseattn.registry import get_policy_class
from sparseattn.types import EMPTY_POSITION

torch.set_grad_enabled(False)

POLICIES = ["snapkv", "pyramidkv", "adakv"]
FAMILIES = ["llama", "qwen2", "gemma3"]  # llama: 4 layers, so PyramidKV has a slope to show
LENGTHS = [60, 47, 6]  # left padded: 13 and 54 pads; the last row is shorter than the window


def model_for(family: str):
    if family != "llama":
        return make_model(family)
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def full_layers(model) -> list[int]:
    types = getattr(model.config, "layer_types", None)
    if types is None:
        return list(range(model.config.num_hidden_layers))
    return [i for i, kind in enumerate(types) if kind == "full_attention"]


# -- each policy's arithmetic, written out here (the oracle of the size tests) -------------
def prefix_capacity(n: int, knobs: dict) -> int:
    """Prefix tokens a head keeps of a row with n prompt tokens (SnapKV's uniform budget)."""
    window = min(knobs.get("window", 32), n)
    prefix = n - window
    if knobs.get("capacity", 0) > 0:
        return min(knobs["capacity"], prefix)
    kept = n - math.floor(Fraction(str(knobs.get("compression", 0.5))) * n)
    return min(max(kept - window, 0), prefix)


def pyramid_capacities(mean: int, prefix: int, layers: int, beta: float = 20) -> list[int]:
    """Per-layer prefix budgets: linear from c_max down to c_min, rounded on the running sum."""
    if layers == 1:
        return [mean]
    c_max = min(Fraction(prefix), (2 - Fraction(1) / Fraction(beta)) * mean)
    c_min = 2 * mean - c_max
    linear = [c_max - (c_max - c_min) * j / (layers - 1) for j in range(layers)]
    sums = [sum(linear[:j]) for j in range(layers + 1)]
    rounded = [math.floor(s + Fraction(1, 2)) for s in sums]
    return [rounded[j + 1] - rounded[j] for j in range(layers)]


def held_per_head(layer, batch: int, heads: int) -> torch.Tensor:
    held = layer.held_tokens()
    return torch.full((batch, heads), held) if isinstance(held, int) else held


def prefill_and_decode(model, policy, knobs, lengths, steps):
    ids, mask = left_padded_batch(lengths, seed=5)
    with sparseattn.sparse_attention(model, evict=policy, evict_knobs=knobs):
        cache = SparseCache(model)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        snapshot = [
            (
                held_per_head(layer, len(lengths), model.config.num_key_value_heads),
                layer.kv_nbytes(),
            )
            for layer in cache.layers
        ]
        token, running = out.logits[:, -1:].argmax(-1), mask
        for _ in range(steps):
            running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
            out = model(input_ids=token, attention_mask=running, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
    return ids, cache, snapshot


@pytest.mark.parametrize(
    "knobs", [{"window": 8}, {"window": 8, "capacity": 20}], ids=["c0.5", "cap"]
)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_held_tokens_follow_the_policy_arithmetic_per_layer_and_head(policy, family, knobs):
    model = model_for(family)
    config = model.config
    steps, width = 5, max(LENGTHS)
    ids, cache, snapshot = prefill_and_decode(model, policy, knobs, LENGTHS, steps)
    full = full_layers(model)
    Hkv, B = config.num_key_value_heads, len(LENGTHS)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total = 0
    for index, (layer, (held, kv_bytes)) in enumerate(zip(cache.layers, snapshot)):
        assert layer.seen == width + steps
        if index not in full:  # the model's sliding layers keep their own window
            assert layer.is_sliding and layer.width == WINDOW
            continue
        rank = full.index(index)
        for b, n in enumerate(LENGTHS):
            window = min(knobs["window"], n)
            mean = prefix_capacity(n, knobs)
            if policy == "snapkv":
                assert held[b].tolist() == [window + mean] * Hkv
            elif policy == "pyramidkv":
                cap = pyramid_capacities(mean, n - window, len(full))[rank]
                assert held[b].tolist() == [window + cap] * Hkv
            else:  # adakv: the layer budget shared by its heads, each above its floor
                assert int(held[b].sum()) == Hkv * (window + mean)
                assert bool((held[b] >= window + int(0.2 * mean)).all())
                assert bool((held[b] <= n).all())
        # generated tokens are all kept, by every head
        assert torch.equal(held_per_head(layer, B, Hkv), held + steps)
        # padding never kept; each head keeps its row's observation window
        positions = layer.positions[..., : layer.width]
        for b, n in enumerate(LENGTHS):
            kept = positions[b][positions[b] != EMPTY_POSITION]
            assert bool((kept >= width - n).all())
            for h in range(Hkv):
                mine = set(positions[b, h].tolist())
                assert set(range(width - min(knobs["window"], n), width + steps)) <= mine
        # memory really freed: storage as wide as the widest head (+ one free slot), in pages
        slots = -(-(int(held.max()) + 1) // 16) * 16
        assert kv_bytes == 2 * B * Hkv * slots * head_dim * 4
        total += kv_bytes
    assert total < len(full) * 2 * B * Hkv * width * head_dim * 4  # below a dense prompt cache


def test_pyramid_budgets_shrink_with_depth_and_total_snapkv():
    caps = pyramid_capacities(22, 52, 4)
    assert caps == sorted(caps, reverse=True) and caps[0] > 22 > caps[-1]
    assert sum(caps) == 4 * 22
    clipped = pyramid_capacities(40, 45, 3)  # c_max capped by the prefix length
    assert clipped[0] == 45 and sum(clipped) == 3 * 40


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "policy,knobs",
    [(p, {"capacity": 10_000}) for p in POLICIES] + [("snapkv", {"compression": 0.0})],
)
def test_budget_covering_the_prompt_equals_dense_generate(family, policy, knobs):
    model = make_model(family)
    ids, mask = left_padded_batch([40, 29], seed=2)
    expected = generate(model, ids, mask)
    with sparseattn.sparse_attention(model, evict=policy, evict_knobs=knobs, min_length=0):
        got = generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )
    assert all(layer.positions is None for layer in got.past_key_values.layers if not layer.bounded)


# -- the kept set against scores computed by hand ------------------------------------------
def capturing(name: str, **knobs):
    """The policy, recording what each full layer's after_prefill saw."""
    records = []

    class Capturing(get_policy_class(name)):
        def after_prefill(self, layer, query, ctx):
            if not layer.bounded:
                valid = None if ctx.key_valid is None else ctx.key_valid.clone()
                keys = layer.call_view()[0].clone()
                records.append((layer, query.clone(), keys, valid, ctx.scaling))
            super().after_prefill(layer, query, ctx)

    return dataclass(Capturing)(**knobs), records


def hand_scores(q, k, valid, scaling, window, kernel) -> torch.Tensor:
    """(B, Hkv, Lp) float64: each observation query's softmax over the keys it sees, averaged
    over the window and the GQA group, max-pooled over [j - r, j + r] of the prefix."""
    B, Hq, L, _ = q.shape
    Hkv = k.shape[1]
    g, w = Hq // Hkv, min(window, L)
    prefix, r = L - w, kernel // 2
    valid = torch.ones(B, L, dtype=torch.bool) if valid is None else valid
    out = torch.full((B, Hkv, prefix), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for kv in range(Hkv):
            total = torch.zeros(L, dtype=torch.float64)
            for h in range(kv * g, kv * g + g):
                for i in range(L - w, L):
                    if not valid[b, i]:
                        continue  # a padding query sees no key: it votes for nothing
                    logits = (k[b, kv, : i + 1].double() @ q[b, h, i].double()) * scaling
                    logits[~valid[b, : i + 1]] = float("-inf")
                    total[: i + 1] += torch.softmax(logits, 0)
            mean = total / (g * w)
            for j in range(prefix):
                if valid[b, j]:
                    out[b, kv, j] = mean[max(0, j - r) : min(prefix, j + r + 1)].max()
    return out


def kept_prefix(layer, b: int, h: int, prefix: int) -> set[int]:
    positions = layer.positions[b, h, : layer.width].tolist()
    return {p for p in positions if p < prefix}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", POLICIES)
def test_kept_set_is_the_top_of_hand_computed_scores(name, family):
    model = model_for(family)
    knobs = {"window": 8, "compression": 0.6}
    policy, records = capturing(name, **knobs)
    ids, mask = left_padded_batch([50, 37], seed=3)
    with sparseattn.sparse_attention(model, evict=policy):
        cache = SparseCache(model)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert len(records) == len(full_layers(model))
    uneven = False
    for rank, (layer, q, k, valid, scaling) in enumerate(records):
        scores = hand_scores(q, k, valid, scaling, 8, 7)  # (B, Hkv, Lp)
        B, Hkv, prefix = scores.shape
        for b, n in enumerate([50, 37]):
            mean = prefix_capacity(n, knobs)
            real = [j for j in range(prefix) if scores[b, 0, j] > float("-inf")]
            kept = [kept_prefix(layer, b, h, prefix) for h in range(Hkv)]
            counts = [len(s) for s in kept]
            if name == "snapkv":
                assert counts == [mean] * Hkv
            elif name == "pyramidkv":
                assert counts == [pyramid_capacities(mean, n - 8, len(records))[rank]] * Hkv
            else:
                assert sum(counts) == Hkv * mean and min(counts) >= int(0.2 * mean)
                uneven |= len(set(counts)) > 1
            joint_low, dropped_high = math.inf, -math.inf
            for h in range(Hkv):
                assert kept[h] <= set(real)  # padding never kept
                low = min((float(scores[b, h, j]) for j in kept[h]), default=math.inf)
                high = max((float(scores[b, h, j]) for j in real if j not in kept[h]), default=-1)
                assert low >= high - 1e-6  # each head keeps a top set of its own scores
                dropped_high = max(dropped_high, high)
                if counts[h] > int(0.2 * mean):  # budget won jointly, over every head
                    joint_low = min(joint_low, low)
            if name == "adakv":
                assert joint_low >= dropped_high - 1e-6
    if name == "adakv":
        assert uneven  # heads keep different counts


# -- padding, rows and decode over the kept set ----------------------------------------------
@pytest.mark.parametrize("name", POLICIES)
def test_padded_row_selects_as_if_alone(name):
    model = make_model("llama")
    knobs = {"window": 8, "compression": 0.5}
    ids, mask = left_padded_batch([60, 41], seed=6)
    with sparseattn.sparse_attention(model, evict=name, evict_knobs=knobs):
        batched = generate(model, ids, mask, steps=6)
        alone = generate(model, ids[1:, 19:], mask[1:, 19:], steps=6)
    torch.testing.assert_close(
        torch.stack(batched.logits)[:, 1], torch.stack(alone.logits)[:, 0], atol=1e-4, rtol=1e-4
    )
    assert torch.equal(batched.sequences[1, 19:], alone.sequences[0])
    for ours, single in zip(batched.past_key_values.layers, alone.past_key_values.layers):
        held = ours.positions[1][ours.positions[1] != EMPTY_POSITION]
        assert sorted((held - 19).tolist()) == sorted(
            single.positions[0][single.positions[0] != EMPTY_POSITION].tolist()
        )


def test_decode_over_adakv_heads_equals_a_per_head_masked_dense_model():
    model = make_model("llama")
    ids, mask = left_padded_batch([60, 47], seed=13)
    with sparseattn.sparse_attention(
        model, evict="adakv", evict_knobs={"window": 8, "compression": 0.7}
    ):
        cache = SparseCache(model)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        kept = [layer.positions[..., : layer.width].clone() for layer in cache.layers]
        tokens, logits, running = [], [], mask
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            tokens.append(token)
            running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
            out = model(input_ids=token, attention_mask=running, past_key_values=cache)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    assert len({int(n) for n in cache.layers[0].held_tokens().flatten()}) > 1
    # oracle: dense transformers, each layer's query heads masked to their KV head's kept set
    dense = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=dense)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    running = mask
    for step, token in enumerate(tokens):
        running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
        total = running.shape[1]
        masks = []
        for held in kept:  # (B, Hkv, C)
            keep = torch.zeros(2, model.config.num_attention_heads, 1, total, dtype=torch.bool)
            for b in range(2):
                for h in range(keep.shape[1]):
                    prompt = [p for p in held[b, h // groups].tolist() if p < 60]
                    keep[b, h, 0, prompt + list(range(60, total))] = True
            masks.append(torch.zeros(keep.shape).masked_fill(~keep, float("-inf")))
        assert not torch.equal(masks[0], masks[1])  # layers keep different sets
        hooks = [
            layer.self_attn.register_forward_pre_hook(
                lambda module, args, kwargs, m=m: (args, {**kwargs, "attention_mask": m}),
                with_kwargs=True,
            )
            for layer, m in zip(model.model.layers, masks)
        ]
        try:
            out = model(
                input_ids=token,
                attention_mask=running,
                position_ids=running.sum(-1, keepdim=True) - 1,
                past_key_values=dense,
            )
        finally:
            for hook in hooks:
                hook.remove()
        torch.testing.assert_close(logits[step], out.logits[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", POLICIES)
def test_no_host_sync_per_decode_step_after_eviction(name, family):
    model = model_for(family)
    ids, mask = left_padded_batch([60, 41], seed=6)
    with sparseattn.sparse_attention(model, evict=name, evict_knobs={"window": 8}):
        run = decode_steps(model, ids, mask)
    assert run.syncs == [[]] * 4


@pytest.mark.parametrize(
    "name,knobs,message",
    [
        ("snapkv", {"kernel": 4}, "kernel=4 must be odd"),
        ("snapkv", {"kernel": 0}, "kernel=0 is out of range"),
        ("snapkv", {"compression": 1.5}, r"compression=1.5 is out of range; allowed: \[0.0, 1.0\]"),
        ("snapkv", {"window": 0}, "window=0 is out of range"),
        ("snapkv", {"capacity": -1}, "capacity=-1 is out of range"),
        ("snapkv", {"capacity": 2.5}, "capacity=2.5 must be an integer"),
        ("pyramidkv", {"beta": 0.5}, "beta=0.5 is out of range"),
        ("adakv", {"floor": 1.2}, "floor=1.2 is out of range"),
        ("adakv", {"budget": 3}, "unknown knob.*'budget'.*allowed knobs: capacity"),
    ],
)
def test_bad_knobs_are_named(name, knobs, message):
    with pytest.raises(UsageError, match=message):
        sparseattn.build_policy(name, **knobs)

"""Head-level policies (duo, lserve, razor, moa): each head holds what its policy's arithmetic
says, in buffers of its own group (memory really freed per head); a budget covering the prompt
equals dense generate; decode over the kept heads equals a per-head masked dense model; the
compensation token is the mean of what was dropped; no host sync per decode step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import left_padded_batch, make_model
from syncs import decode_steps
from test_cache import generate
from test_eviction_policies import full_layers, model_for
from transformers import DynamicCache

import sparseattn
from sparseattn.backends.sdpa import dense_decode
from sparseattn.cache import CompensatedLayer, HeadGroupsLayer, SparseCache
from sparseattn.errors import UsageError
from sparseattn.methods.eviction.heads import heads_for_compression
from sparseattn.profiles import fingerprint, save_profile, span_at
from sparseattn.types import EMPTY_POSITION, AttentionContext, Phase

torch.set_grad_enabled(False)

FAMILIES = ["llama", "qwen2", "gemma3"]
LENGTHS = [60, 47, 6]  # left padded; the last row is shorter than every window
RULES = [
    {"alpha": 8, "beta": 0.0, "sink": 2},
    {"alpha": 4, "beta": 0.25, "sink": 2},
    {"alpha": 10**6, "beta": 0.0, "sink": 64},  # the whole prompt, and room to generate
]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_profile(path, kind, model, heads, choices=None, calibration=None) -> str:
    save_profile(
        path,
        kind=kind,
        model={"id": "tiny", **fingerprint(model.config)},
        calibration=calibration or {},
        heads=heads,
        summary={},
        choices=choices,
    )
    return str(path)


def random_table(model, per_query_head: bool, seed: int) -> list[list[float]]:
    config = model.config
    g = torch.Generator().manual_seed(seed)
    heads = config.num_attention_heads if per_query_head else config.num_key_value_heads
    return torch.rand(config.num_hidden_layers, heads, generator=g).round(decimals=4).tolist()


def profiles(model, tmp_path) -> dict[str, str]:
    """A duo, retrieval and moa profile of ``model`` with seeded values."""
    layers, Hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    rules = [[(layer + h) % len(RULES) for h in range(Hkv)] for layer in range(layers)]
    return {
        "duo": write_profile(
            tmp_path / "duo.json",
            "duo",
            model,
            {0.0: random_table(model, False, 1)},
            calibration={"sink": 4, "window": 8},
        ),
        "retrieval": write_profile(
            tmp_path / "ret.json", "retrieval", model, {0.0: random_table(model, True, 2)}
        ),
        "moa": write_profile(tmp_path / "moa.json", "moa", model, {0.5: rules}, choices=RULES),
    }


def held(layer, batch: int, heads: int) -> torch.Tensor:
    """(B, Hkv) tokens held per row and KV head."""
    count = layer.held_tokens()
    return torch.full((batch, heads), count) if isinstance(count, int) else count


def run(model, policy, knobs, lengths, steps):
    """Prefill the left-padded batch under the policy, then decode ``steps`` greedy tokens."""
    ids, mask = left_padded_batch(lengths, seed=5)
    with sparseattn.sparse_attention(model, evict=policy, evict_knobs=knobs, min_length=0):
        cache = SparseCache(model)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        token, running = out.logits[:, -1:].argmax(-1), mask
        for _ in range(steps):
            running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
            out = model(input_ids=token, attention_mask=running, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
    return cache


# -- each policy's arithmetic, written out here (the oracle of the size tests) -------------
def ranked(scores: dict, count: int, highest: bool) -> set:
    order = sorted(scores, key=lambda key: ((-1 if highest else 1) * scores[key], key))
    return set(order[:count])


def expected_heads(policy, model, table, knobs, length):
    """{(layer, kv_head): (sink, window, compensated) or None (kept whole)} over full layers."""
    config, full = model.config, full_layers(model)
    Hkv = config.num_key_value_heads
    g = config.num_attention_heads // Hkv
    if policy in ("duo", "lserve"):
        gates = {(i, h): table[i][h] for i in full for h in range(Hkv)}
        streaming = ranked(gates, round(0.5 * len(gates)), highest=False)
        return {key: (4, 8, False) if key in streaming else None for key in gates}
    if policy == "razor":
        scores = {(i, h): max(table[i][h * g : h * g + g]) for i in full for h in range(Hkv)}
        whole = ranked(scores, round(knobs["retrieval"] * len(scores)), highest=True)
        window = max(knobs["window"], round(0.2 * length))
        return {key: None if key in whole else (knobs["sink"], window, True) for key in scores}
    rules = table  # moa: rule index per (layer, head)
    return {
        (i, h): (RULES[rules[i][h]]["sink"], span_at(RULES[rules[i][h]], length), False)
        for i in full
        for h in range(Hkv)
    }


KNOBS = {
    "duo": {},
    "lserve": {"budget": 16, "page": 8},
    "razor": {"retrieval": 0.5, "sink": 2, "window": 8},
    "moa": {},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["duo", "lserve", "razor", "moa"])
def test_each_head_holds_its_policy_arithmetic_in_its_own_buffers(policy, family, tmp_path):
    model = model_for(family)
    config = model.config
    files = profiles(model, tmp_path)
    kind = {"duo": "duo", "lserve": "duo", "razor": "retrieval", "moa": "moa"}[policy]
    profile = sparseattn.profiles.load_profile(files[kind], kind)
    table = profile.heads[profile.levels[0]]
    knobs = {**KNOBS[policy], "profile": files[kind]}
    steps, width, B = 5, max(LENGTHS), len(LENGTHS)
    cache = run(model, policy, knobs, LENGTHS, steps)
    plan = expected_heads(policy, model, table, knobs, width)
    D, Hkv = head_dim(config), config.num_key_value_heads
    for index, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == width + steps
        if index not in full_layers(model):
            assert not isinstance(layer, HeadGroupsLayer) and layer.is_sliding
            continue
        assert isinstance(layer, HeadGroupsLayer)
        count = held(layer, B, Hkv)
        expected_bytes = 0
        for group in layer.groups:
            sizes = {plan[(index, h)] for h in group.heads}
            assert len(sizes) == 1  # a group holds heads of one kind and size
            size = sizes.pop()
            if size is None:  # whole: every slot of the padded batch, in a full layer
                assert group.layer.window is None
                for h in group.heads:
                    assert count[:, h].tolist() == [width + steps] * B
                capacity = group.layer.capacity
            else:
                sink, window, compensated = size
                assert isinstance(group.layer, CompensatedLayer) == compensated
                for b, n in enumerate(LENGTHS):
                    total = n + steps
                    kept = min(total, sink + window) + (compensated and total > sink + window)
                    assert count[b, list(group.heads)].tolist() == [kept] * len(group.heads)
                capacity = -(-(sink + window + compensated) // 16) * 16
                assert group.layer.capacity == capacity
            expected_bytes += 2 * B * len(group.heads) * capacity * D * 4
        assert layer.kv_nbytes() == expected_bytes


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize(
    "policy,knobs",
    [
        ("duo", {"window": 10_000, "sink": 4}),
        ("lserve", {"window": 10_000, "sink": 4, "budget": 10_000}),
        ("razor", {"window": 10_000}),
        ("razor", {"retrieval": 1.0}),
        ("moa", {"profile_rule": 2}),
    ],
    ids=["duo", "lserve", "razor-window", "razor-all-whole", "moa"],
)
def test_budget_covering_the_prompt_equals_dense_generate(family, policy, knobs, tmp_path):
    model = make_model(family)
    files = profiles(model, tmp_path)
    if "profile_rule" in knobs:  # every head gets the rule whose span covers everything
        rows = [[2] * model.config.num_key_value_heads] * model.config.num_hidden_layers
        files["moa"] = write_profile(tmp_path / "all.json", "moa", model, {0.5: rows}, RULES)
        knobs = {}
    kind = {"duo": "duo", "lserve": "duo", "razor": "retrieval", "moa": "moa"}[policy]
    ids, mask = left_padded_batch([40, 29], seed=2)
    expected = generate(model, ids, mask)
    with sparseattn.sparse_attention(
        model, evict=policy, evict_knobs={**knobs, "profile": files[kind]}, min_length=0
    ):
        got = generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )


# -- decode over the kept heads against a per-head masked dense model ------------------------
def per_head_oracle(model, ids, mask, tokens, keep):
    """Dense transformers step by step, each layer's query heads masked by ``keep(layer, b,
    kv_head, total, n)`` -> kept positions (the prompt itself attended densely)."""
    config = model.config
    Hq, g = config.num_attention_heads, config.num_attention_heads // config.num_key_value_heads
    cache = DynamicCache(config=config)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    running, lengths, logits = mask, mask.sum(-1).tolist(), []
    for token in tokens:
        running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
        total = running.shape[1]
        lengths = [n + 1 for n in lengths]
        masks = []
        for index in range(config.num_hidden_layers):
            allowed = torch.zeros(len(lengths), Hq, 1, total, dtype=torch.bool)
            for b, n in enumerate(lengths):
                for h in range(Hq):
                    allowed[b, h, 0, keep(index, b, h // g, total, n)] = True
            masks.append(torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")))
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
                past_key_values=cache,
            )
        finally:
            for hook in hooks:
                hook.remove()
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_duo_decode_equals_a_per_head_masked_dense_model(tmp_path):
    model = model_for("llama")
    files = profiles(model, tmp_path)
    table = sparseattn.profiles.load_profile(files["duo"], "duo").heads[0.0]
    lengths, sink, window = [40, 27], 4, 8
    ids, mask = left_padded_batch(lengths, seed=8)
    knobs = {"profile": files["duo"], "prefill_streaming": False}
    with sparseattn.sparse_attention(model, evict="duo", evict_knobs=knobs, min_length=0):
        got = generate(model, ids, mask, steps=6)
    plan = expected_heads("duo", model, table, knobs, max(lengths))
    assert {v for v in plan.values()} == {None, (4, 8, False)}  # both kinds present
    width = max(lengths)

    def keep(layer, b, kv_head, total, n):
        first = width - lengths[b]  # left padding of the row
        valid = list(range(first, total))
        if plan[(layer, kv_head)] is None:
            return valid
        return valid[:sink] + valid[sink:][-window:]

    tokens = got.sequences[:, width:].T[:-1, :, None]
    expected = per_head_oracle(model, ids, mask, tokens, keep)
    torch.testing.assert_close(torch.stack(got.logits[1:], 1), expected, atol=1e-4, rtol=1e-4)


def test_streaming_heads_prefill_with_their_own_pattern(tmp_path):
    model = model_for("llama")
    files = profiles(model, tmp_path)
    ids, _ = left_padded_batch([200], seed=3)
    knobs = {"profile": files["duo"], "sink": 16, "window": 32}
    runs = {}
    for backend in ("flex", "reference"):
        with sparseattn.sparse_attention(
            model,
            prefill="dense",
            prefill_knobs={"block_size": 16},
            evict="duo",
            evict_knobs=knobs,
            min_length=0,
            prefill_backend=backend,
        ) as stats:
            runs[backend] = model(input_ids=ids).logits
        heads = stats.head_density("prefill")
    torch.testing.assert_close(runs["flex"], runs["reference"], atol=1e-4, rtol=1e-4)
    with sparseattn.sparse_attention(
        model, "streaming", sink=16, window=32, block_size=16, min_length=0
    ) as alone:
        model(input_ids=ids)
    pattern = alone.head_density("prefill")[0][0]
    assert pattern < 0.6
    table = sparseattn.profiles.load_profile(files["duo"], "duo").heads[0.0]
    plan = expected_heads("duo", model, table, knobs, 200)
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, densities in heads.items():
        for h, density in enumerate(densities):
            streaming = plan[(layer, h // g)] is not None
            assert density == pytest.approx(pattern if streaming else 1.0)


@pytest.mark.parametrize(
    "policy,knobs",
    [("duo", {"prefill_streaming": False}), ("razor", {"retrieval": 0.5, "window": 8, "sink": 2})],
)
def test_a_dense_prompt_cache_taken_over_equals_prefilling_under_the_policy(
    policy, knobs, tmp_path
):
    """A cache filled densely outside the block and passed in keeps what the policy keeps of it
    and decodes exactly as a prompt prefilled inside the block (the frontier's prefill reuse)."""
    model = model_for("llama")
    files = profiles(model, tmp_path)
    knobs = {**knobs, "profile": files["duo" if policy == "duo" else "retrieval"]}
    ids, _ = left_padded_batch([70], seed=9)
    dense = DynamicCache(config=model.config)
    first = model(input_ids=ids, past_key_values=dense).logits[:, -1:].argmax(-1)
    outs = []
    for cache in (dense, None):
        with sparseattn.sparse_attention(model, evict=policy, evict_knobs=knobs, min_length=0):
            if cache is None:
                cache = SparseCache(model)
                model(input_ids=ids, past_key_values=cache)
            token, logits = first, []
            for _ in range(5):
                out = model(input_ids=token, past_key_values=cache)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        outs.append((torch.stack(logits), [held(layer, 1, 2) for layer in cache.layers]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for adopted, prefilled in zip(outs[0][1], outs[1][1]):
        assert torch.equal(adopted, prefilled)


# -- RazorAttention's compensation token ------------------------------------------------------
def test_compensation_token_is_the_mean_of_every_dropped_token(tmp_path):
    model = model_for("llama")
    files = profiles(model, tmp_path)
    lengths, steps, sink, window = [60, 41], 6, 2, 8
    knobs = {"profile": files["retrieval"], "retrieval": 0.5, "sink": sink, "window": window}
    ids, mask = left_padded_batch(lengths, seed=5)
    # the dense keys and values at every position, from a dense run of the same tokens
    dense = DynamicCache(config=model.config)
    tokens = torch.cat([ids, torch.zeros(2, steps, dtype=torch.long)], 1)
    with sparseattn.sparse_attention(model, evict="razor", evict_knobs=knobs, min_length=0):
        ours = SparseCache(model)
        out = model(input_ids=ids, attention_mask=mask, past_key_values=ours)
        running, token = mask, out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            tokens[:, 60 + step] = token[:, 0]
            running = torch.cat([running, torch.ones_like(running[:, :1])], 1)
            out = model(input_ids=token, attention_mask=running, past_key_values=ours)
            token = out.logits[:, -1:].argmax(-1)
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], 1)
    # bare forwards place token t at position t, padding included: the same positions here
    model(input_ids=tokens, attention_mask=full_mask, past_key_values=dense)
    total = 60 + steps
    checked = 0
    for index, layer in enumerate(ours.layers):
        for group in layer.groups:
            if not isinstance(group.layer, CompensatedLayer):
                continue
            comp = group.layer
            assert comp.window == max(window, round(0.2 * 60))  # the buffer: max(S0, N / C)
            slot = comp.sink + comp.window
            heads = list(group.heads)
            for b, n in enumerate(lengths):
                valid = list(range(60 - n, total))
                dropped = valid[sink : -comp.window]
                k = dense.layers[index].keys[b, heads][:, dropped].mean(1)  # (h, D)
                v = dense.layers[index].values[b, heads][:, dropped].mean(1)
                torch.testing.assert_close(comp.keys[b, :, slot], k, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(comp.values[b, :, slot], v, atol=1e-5, rtol=1e-4)
                assert int(comp.positions[b, 0, slot]) == dropped[-1]
                bias = comp.key_bias()[b, 0]
                assert float(bias[slot]) == pytest.approx(math.log(len(dropped)))
                assert float(bias[:slot].abs().sum()) == 0
                checked += 1
    assert checked > 0


def test_compensated_decode_weights_the_token_by_its_count():
    """dense_decode with a key bias = softmax where the last key stands for m copies of itself."""
    torch.manual_seed(0)
    B, Hq, Hkv, L, D, m = 2, 4, 2, 9, 8, 5.0
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    bias = torch.zeros(B, 1, L)
    bias[:, 0, -1] = math.log(m)
    ctx = AttentionContext(
        layer_idx=0, phase=Phase.DECODE, batch=B, q_len=1, kv_len=L, q_offset=L, kv_offset=0,
        num_q_heads=Hq, num_kv_heads=Hkv, scaling=D**-0.5, key_bias=bias,
    )  # fmt: skip
    out = dense_decode(q, k, v, ctx, all_visible=True)  # (B, 1, Hq, D)
    for b in range(B):
        for h in range(Hq):
            weights = torch.exp(k[b, h // 2] @ q[b, h, 0] * D**-0.5)
            weights[-1] *= m
            expected = (weights[:, None] * v[b, h // 2]).sum(0) / weights.sum()
            torch.testing.assert_close(out[b, 0, h], expected, atol=1e-5, rtol=1e-5)


# -- compression targets -----------------------------------------------------------------------
@pytest.mark.parametrize("compression", [0.3, 0.5, 0.7])
def test_duo_compression_picks_the_fewest_streaming_heads_reaching_it(compression, tmp_path):
    model = model_for("llama")
    files = profiles(model, tmp_path)
    length = 60
    knobs = {"profile": files["duo"], "compression": compression}
    cache = run(model, "duo", knobs, [length], steps=0)
    Hkv = model.config.num_key_value_heads
    kept = sum(int(held(layer, 1, Hkv).sum()) for layer in cache.layers)
    heads = len(cache.layers) * Hkv
    removed = 1 - kept / (heads * length)
    count = heads_for_compression(compression, heads, 12, length)
    streaming = sum(
        len(g.heads) for layer in cache.layers for g in layer.groups if g.kind == "streaming"
    )
    assert streaming == count
    assert removed >= compression - 1e-9
    assert (count - 1) / heads * (1 - 12 / length) < compression  # one fewer falls short


def test_razor_compression_sets_the_buffer(tmp_path):
    model = model_for("llama")
    files = profiles(model, tmp_path)
    knobs = {"profile": files["retrieval"], "retrieval": 0.25, "compression": 0.6, "sink": 4}
    cache = run(model, "razor", knobs, [120], steps=0)
    Hkv = model.config.num_key_value_heads
    kept = sum(int(held(layer, 1, Hkv).sum()) for layer in cache.layers)
    heads = len(cache.layers) * Hkv
    assert 1 - kept / (heads * 120) == pytest.approx(0.6, abs=1.5 / 120)


# -- no host sync, errors ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["duo", "lserve", "razor", "moa"])
def test_no_host_sync_per_decode_step(policy, tmp_path):
    model = model_for("gemma3")
    files = profiles(model, tmp_path)
    kind = {"duo": "duo", "lserve": "duo", "razor": "retrieval", "moa": "moa"}[policy]
    ids, mask = left_padded_batch([60, 41], seed=6)
    knobs = {**KNOBS[policy], "profile": files[kind]}
    with sparseattn.sparse_attention(model, evict=policy, evict_knobs=knobs, min_length=0):
        run = decode_steps(model, ids, mask)
    assert run.syncs == [[]] * 4


def test_a_profile_of_another_model_is_refused_naming_both(tmp_path):
    small, other = make_model("llama"), model_for("llama")  # 2 vs 4 layers
    path = profiles(small, tmp_path)["duo"]
    with pytest.raises(UsageError, match="was made for tiny.*2 layers.*but the model is.*4 layers"):
        with sparseattn.sparse_attention(other, evict="duo", evict_knobs={"profile": path}):
            pass


@pytest.mark.parametrize(
    "name,knobs,message",
    [
        ("duo", {"sparsity": 1.5}, r"sparsity=1.5 is out of range"),
        ("duo", {"profile": "nope"}, "neither a .json file nor a shipped profile"),
        ("lserve", {"page": 12}, "page=12 is not allowed"),
        ("razor", {"retrieval": -0.1}, "retrieval=-0.1 is out of range"),
        ("moa", {"compression": 2}, "compression=2 is out of range"),
    ],
)
def test_bad_knobs_are_named(name, knobs, message):
    with pytest.raises(UsageError, match=message):
        sparseattn.build_policy(name, **knobs)


def test_empty_profile_name_is_refused(tmp_path):
    model = make_model("llama")
    with pytest.raises(UsageError, match="profile=''; a duo profile is needed"):
        with sparseattn.sparse_attention(model, evict="duo", evict_knobs={"profile": ""}):
            pass


def test_positions_of_streaming_heads_never_hold_padding(tmp_path):
    model = model_for("llama")
    files = profiles(model, tmp_path)
    cache = run(model, "duo", {"profile": files["duo"]}, LENGTHS, steps=3)
    width = max(LENGTHS)
    for layer in cache.layers:
        for group in layer.groups:
            if group.kind != "streaming":
                continue
            positions = group.layer.positions[:, 0, : group.layer.width]
            for b, n in enumerate(LENGTHS):
                kept = positions[b][positions[b] != EMPTY_POSITION]
                assert bool((kept >= width - n).all())


def test_head_group_counts_stay_on_the_host_and_spread_when_read():
    """A head group's host counts (one number per head of the group) land on its heads only:
    hand-computed totals for two groups of a 4-head layer, with a device-counted call mixed in."""
    from sparseattn.integration.stats import LayerStats

    stats = LayerStats(0)
    first, second = torch.tensor([0, 1]), torch.tensor([2, 3])
    for _ in range(2):
        stats.add("dense", 10.0, 20.0, heads=(first, 4))
        stats.add("streaming", 5.0, 20.0, heads=(second, 4))
    assert stats.computed is None  # nothing counted on a device yet
    computed, visible = stats.totals()
    assert computed.tolist() == [20.0, 20.0, 10.0, 10.0]
    assert visible.tolist() == [40.0, 40.0, 40.0, 40.0]
    # a call that counted on the device, per row and head of the group
    stats.add("quest", torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 3.0]]), heads=(first, 4))
    computed, visible = stats.totals()
    assert computed.tolist() == [21.0, 22.0, 10.0, 10.0]
    assert visible.tolist() == [43.0, 43.0, 40.0, 40.0]
    assert stats.head_density == pytest.approx([21 / 43, 22 / 43, 0.25, 0.25])

"""Memory bounded by the budget, not by the prompt: every policy compresses after every prompt
chunk (the kept set checked against scores computed by hand), head-level layers release the
call once attended, full layers grow in proportion to what they hold, and re-rotated sinks are
rotated once."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from test_eviction_policies import capturing, model_for
from test_head_policies import profiles

import sparseattn
from sparseattn.cache import SparseCache
from sparseattn.cache.groups import HeadGroupsLayer
from sparseattn.cache.layers import KVLayer, grown_capacity
from sparseattn.types import EMPTY_POSITION

torch.set_grad_enabled(False)

CHUNK = 32


def chunked_prefill(model, ids, chunk: int, mask=None, **setting):
    """Feed ``ids`` in chunks through one cache; yield the cache after every chunk."""
    cache = None
    with sparseattn.sparse_attention(model, min_length=0, **setting):
        for start in range(0, ids.shape[1], chunk):
            stop = min(start + chunk, ids.shape[1])
            kwargs = {} if mask is None else {"attention_mask": mask[:, :stop]}
            out = model(input_ids=ids[:, start:stop], past_key_values=cache, **kwargs)
            cache = out.past_key_values
            yield stop, cache


def budget(tokens: int, compression: float) -> int:
    """Tokens one head keeps of ``tokens`` under SnapKV's compression rule."""
    return tokens - int(compression * tokens + 1e-9)


def held_per_head(layer: KVLayer) -> torch.Tensor:
    """(B, Hkv) tokens held."""
    count = layer.held_tokens()
    if isinstance(count, int):
        return torch.full((layer.keys.shape[0], layer.keys.shape[1]), count)
    return count.expand(layer.keys.shape[0], layer.keys.shape[1])


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv"])
def test_every_chunk_is_compressed_to_the_budget_of_the_tokens_seen(policy):
    """After every chunk a layer holds the budget of the tokens seen so far (SnapKV: each head
    exactly; PyramidKV: the layers' mean; AdaKV: the layer's total), never the whole prompt.
    Before chunked compression, every chunk after the first was kept whole."""
    model = model_for("llama")
    ids = torch.randint(1, 128, (1, 160), generator=torch.Generator().manual_seed(1))
    knobs = {"compression": 0.75, "window": 4}
    for seen, cache in chunked_prefill(model, ids, CHUNK, evict=policy, evict_knobs=knobs):
        expected = budget(seen, 0.75)
        held = torch.stack([held_per_head(layer) for layer in cache.layers])  # (layers, B, H)
        H = held.shape[-1]
        if policy == "snapkv":
            assert (held == expected).all(), (seen, held.flatten().tolist())
        elif policy == "pyramidkv":
            assert held.float().mean() == pytest.approx(expected, abs=1), seen
        else:
            assert (held.sum(-1) == H * expected).all(), (seen, held.sum(-1).flatten().tolist())
        for layer in cache.layers:  # storage follows what is held: one page of headroom
            assert layer.capacity <= int(held_per_head(layer).max()) + 1 + layer.page_size


def test_chunked_selection_equals_scores_computed_by_hand():
    """A later chunk's last queries score every held key (earlier chunks' kept keys and the
    chunk's own); the layer keeps the top ``budget - window`` of the prefix slots per head."""
    model = make_model("llama")
    ids = torch.randint(1, 128, (2, 96), generator=torch.Generator().manual_seed(2))
    policy, records = capturing("snapkv", compression=0.5, window=4, kernel=1)
    positions_seen, kept = [], []

    class Recording(type(policy)):
        def after_prefill(self, layer, query, ctx):
            if not layer.bounded:
                positions = layer.call_view()[2]
                positions_seen.append(None if positions is None else positions.clone())
            super().after_prefill(layer, query, ctx)
            if not layer.bounded:
                kept.append(layer.positions[..., : layer.width].clone())

    recording = Recording(compression=0.5, window=4, kernel=1)
    list(chunked_prefill(model, ids, CHUNK, evict=recording))
    checked = 0
    for (_, q, k, _, scaling), positions, after in zip(records, positions_seen, kept):
        if positions is None:
            continue  # the first chunk: covered by test_eviction_policies
        B, Hq, n, _ = q.shape
        Hkv, g = k.shape[1], q.shape[1] // k.shape[1]
        kp = positions.expand(B, Hkv, -1)  # (B, Hkv, held)
        seen = int(kp[kp != EMPTY_POSITION].max()) + 1
        prefix = k.shape[2] - 4
        cap = budget(seen, 0.5) - 4
        for b in range(B):
            for kv in range(Hkv):
                total = torch.zeros(k.shape[2], dtype=torch.float64)
                for h in range(kv * g, kv * g + g):
                    for i in range(n - 4, n):
                        qpos = seen - n + i
                        logits = (k[b, kv].double() @ q[b, h, i].double()) * scaling
                        logits[kp[b, kv] > qpos] = float("-inf")
                        total += torch.softmax(logits, 0)
                scores = total[:prefix]
                scores[kp[b, kv, :prefix] == EMPTY_POSITION] = float("-inf")
                top = scores.topk(cap).indices
                want = set(kp[b, kv, top].tolist())
                got = set(after[b, kv].tolist()) - {EMPTY_POSITION}
                got = {p for p in got if p < seen - 4}
                assert got == want, (b, kv, sorted(got ^ want))
                checked += 1
    assert checked > 0


def test_generate_with_prefill_chunk_size_compresses_every_chunk():
    """transformers' own chunked prefill goes through the same path: the cache ``generate``
    returns holds the budget of the prompt plus the generated tokens, equal to the manual
    chunked loop's cache after the prompt."""
    model = make_model("llama")
    ids = torch.randint(1, 128, (1, 128), generator=torch.Generator().manual_seed(3))
    knobs = {"compression": 0.75, "window": 4}
    with sparseattn.sparse_attention(model, min_length=0, evict="snapkv", evict_knobs=knobs):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=3,
            do_sample=False,
            prefill_chunk_size=CHUNK,
            return_dict_in_generate=True,
        )
    *_, (_, manual) = chunked_prefill(model, ids, CHUNK, evict="snapkv", evict_knobs=knobs)
    for got, want in zip(out.past_key_values.layers, manual.layers):
        assert (held_per_head(got) == budget(128, 0.75) + 2).all()  # + the 2 appended tokens
        held = want.width
        torch.testing.assert_close(got.positions[..., :held], want.positions[..., :held])
        torch.testing.assert_close(got.keys[:, :, :held], want.keys[:, :, :held])


@pytest.mark.parametrize(
    "setting",
    [
        {"evict": "streaming", "evict_knobs": {"sink": 4, "window": 24}},
        {"evict": "razor", "evict_knobs": {"sink": 4, "window": 24, "ratio": 0.0}},
        {"evict": "duo", "evict_knobs": {"sparsity": 0.5, "sink": 4, "window": 24}},
    ],
    ids=["streaming", "razor", "duo"],
)
def test_bounded_layers_stay_within_slots_plus_one_chunk(setting, tmp_path):
    """Rings and head groups compact after every chunk: a bounded group never holds more
    than sink + window (+ its compensation token); no layer references the call after it."""
    model = make_model("llama")
    if setting["evict"] in ("razor", "duo"):
        kind = "duo" if setting["evict"] == "duo" else "retrieval"
        knobs = {**setting["evict_knobs"], "profile": profiles(model, tmp_path)[kind]}
        setting = {**setting, "evict_knobs": knobs}
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(4))
    for _, cache in chunked_prefill(model, ids, CHUNK, **setting):
        for layer in cache.layers:
            groups = layer.groups if isinstance(layer, HeadGroupsLayer) else None
            if groups is not None:
                assert layer.keys is None and layer.call_view() is None  # released
            for part in [g.layer for g in groups] if groups else [layer]:
                if part.bounded:
                    assert part.width + part.extra_held <= 4 + 24 + part.extra_slots
                    assert part.capacity <= 4 + 24 + part.extra_slots + part.page_size
                    assert part.call_view()[0].shape[2] == part.width + part.extra_held


def test_full_layer_grows_in_proportion_to_what_it_holds():
    """Appending to a full layer allocates at most 1/16 (at least a page) beyond what it needs,
    never a fixed block of spare slots."""
    layer = KVLayer(page_size=16)
    k = torch.randn(1, 2, 1000, 8)
    layer.update(k, k)
    assert layer.capacity == grown_capacity(1000, 16) <= 1000 + 1000 // 16 + 16
    for _ in range(100):
        layer.update(k[:, :, :1], k[:, :, :1])
    assert 1100 <= layer.capacity <= 1100 + 1100 // 16 + 16
    small = KVLayer(page_size=16)
    small.update(k[:, :, :5], k[:, :, :5])
    assert small.capacity == 16  # 5 held: one page


def test_rerotated_sinks_rotate_once_after_a_call_following_decode_steps():
    """Streaming with rerotate: after decode steps, a multi-token call compacts the ring; the
    sinks must then sit right before the oldest window token, as keys computed by the model at
    those positions (layer 0's keys depend only on the token and its position)."""
    model = make_model("llama")
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(5))
    sink, window = 4, 16
    knobs = {"sink": sink, "window": window, "rerotate": True}
    with sparseattn.sparse_attention(model, min_length=0, evict="streaming", evict_knobs=knobs):
        out = model(input_ids=ids[:, :40])
        cache = out.past_key_values
        for step in range(40, 50):  # decode steps re-rotate the sinks
            out = model(input_ids=ids[:, step : step + 1], past_key_values=cache)
        out = model(input_ids=ids[:, 50:60], past_key_values=cache)  # a multi-token call
        out = model(input_ids=ids[:, :1], past_key_values=cache)  # one more decode step
    layer = cache.layers[0]
    window_pos = layer.positions[0, 0, sink : layer.width]
    oldest = int(window_pos.min())
    target = torch.arange(oldest - sink, oldest)[None]  # (1, sink) consecutive before the window
    reference = SparseCache(model)
    model(input_ids=ids[:, :sink], position_ids=target, past_key_values=reference)
    torch.testing.assert_close(
        layer.keys[:, :, :sink], reference.layers[0].keys[:, :, :sink], atol=1e-5, rtol=1e-5
    )


def test_prompt_memory_sweep_holds_the_budget_per_length():
    """``bench memory --prompt-tokens A,B`` records per length: the cache a chunked SnapKV keeps
    is the budget of the tokens seen (held bytes from the policy's arithmetic), dense's is the
    whole prompt, and the peak is measured per run (resident high-water mark reset)."""
    from sparseattn import load_model
    from sparseattn.bench.memory import run_prompt_memory
    from sparseattn.setting import Setting

    model, tok = load_model("tiny-random-llama")
    config = model.config
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers
    snap = Setting.parse("evict=snapkv[compression=0.75,window=8];chunk=64")
    assert Setting.parse(snap.label) == snap  # the label round-trips, chunk included
    lengths = [256, 512]
    for setting, kept in [(Setting(), lambda n: n + 3), (snap, lambda n: budget(n, 0.75) + 3)]:
        records = list(run_prompt_memory(model, tok, setting, lengths, new_tokens=3))
        assert [r["prompt_tokens"] for r in records] == lengths
        for r in records:
            assert r["kv_held_bytes"] == kept(r["prompt_tokens"]) * per_token
            assert r["kv_bytes"] >= r["kv_held_bytes"]
            assert r["peak_added_mb"] is not None and r["peak_memory_method"]


@pytest.mark.parametrize(
    "family, setting",
    [
        ("llama", {"evict": "snapkv", "evict_knobs": {"compression": 0.75, "window": 4}}),
        ("llama", {"evict": "streaming", "evict_knobs": {"sink": 4, "window": 24}}),
        ("qwen2", {"evict": "pyramidkv", "evict_knobs": {"compression": 0.5, "window": 4}}),
    ],
    ids=["snapkv", "streaming", "pyramidkv-qwen2-sliding"],
)
def test_chunks_over_kept_keys_run_as_contiguous_calls_with_the_masked_result(
    family, setting, monkeypatch
):
    """A chunk over a layer that evicted, with every held key older than the chunk, runs as a
    contiguous call (tiles or causal SDPA, no heads x chunk x held score matrix); its logits
    equal the masked product over the kept positions (the relabelling turned off)."""
    from sparseattn.integration import prefill

    model = make_model(family)
    ids = torch.randint(1, 128, (1, 130), generator=torch.Generator().manual_seed(5))
    relabelled = []
    original = prefill.as_contiguous_chunk

    def counting(ctx, layer):
        out = original(ctx, layer)
        relabelled.append(out is not ctx)
        return out

    monkeypatch.setattr(prefill, "as_contiguous_chunk", counting)
    logits = _chunk_logits(model, ids, setting)
    assert any(relabelled)  # the path under test ran
    if family == "qwen2":  # the model's sliding layer keeps its window by position: never
        assert not all(relabelled)
    monkeypatch.setattr(prefill, "as_contiguous_chunk", lambda ctx, layer: ctx)
    torch.testing.assert_close(logits, _chunk_logits(model, ids, setting), atol=1e-4, rtol=1e-4)


def _chunk_logits(model, ids, setting) -> torch.Tensor:
    """Every position's logits of a chunked prefill under ``setting``."""
    cache, outs = None, []
    with sparseattn.sparse_attention(model, min_length=0, **setting):
        for start in range(0, ids.shape[1], CHUNK):
            out = model(input_ids=ids[:, start : start + CHUNK], past_key_values=cache)
            cache = out.past_key_values
            outs.append(out.logits)
    return torch.cat(outs, 1)

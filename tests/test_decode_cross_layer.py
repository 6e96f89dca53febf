"""Cross-layer decode selection (TidalDecode, DELTA): reusing layers read exactly the tokens the
selection layer of the same step chose, never a choice of another step, row or call."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import covering_budget, left_padded_batch, make_model, tiny_config
from syncs import decode_steps
from test_cache import KeepPerHead, generate
from test_decode_methods import decode_call
from transformers import AutoModelForCausalLM

import sparseattn
from sparseattn.errors import UsageError
from sparseattn.methods.decode.crosslayer import Chosen, choose_positions
from sparseattn.methods.decode.delta import Delta
from sparseattn.methods.decode.tidal import TidalDecode
from sparseattn.types import DecodeView

torch.set_grad_enabled(False)

KNOBS = {"budget": 16, "sink": 2, "window": 4}
# two methods, one layer plan: 0 dense, 1 selects, 2 reads 1's choice, 3 selects, 4 reads 3's
SAME_ROLES = [
    TidalDecode(full_layers=1, reselect_layer=3, **KNOBS),
    Delta(full_layers=1, select_every=2, **KNOBS),
]
ROLES = {0: "dense", 1: "select", 2: 1, 3: "select", 4: 3}


def build(family: str, layers: int | None = None, layer_types: list[str] | None = None):
    config = tiny_config(family)
    if layers is not None:
        config.num_hidden_layers = layers
    if layer_types is not None:
        config.num_hidden_layers, config.layer_types = len(layer_types), layer_types
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()


@dataclasses.dataclass
class Call:
    step: int
    layer: int
    q: torch.Tensor
    keys: torch.Tensor
    positions: torch.Tensor | None
    selection: object


def capture(method) -> list[Call]:
    """Record every select_decode call of ``method`` (inputs copied, output kept)."""
    calls: list[Call] = []
    original = method.select_decode

    def select_decode(q, view, ctx):
        selection = original(q, view, ctx)
        positions = None if ctx.key_positions is None else ctx.key_positions.clone()
        calls.append(
            Call(view.seen, ctx.layer_idx, q.clone(), view.keys.clone(), positions, selection)
        )
        return selection

    method.select_decode = select_decode
    return calls


def expected_positions(q, keys, valid, scaling, budget, sink, window) -> list[set[int]]:
    """Per row, the chosen positions computed by hand from a contiguous layer's q and keys:
    every query head's softmax over the visible keys, summed over all heads; the forced tokens
    (the row's first ``sink`` valid positions, the last ``window`` positions, the current one)
    first, then the largest mass."""
    B, Hq, _, D = q.shape
    keys = keys.repeat_interleave(Hq // keys.shape[1], dim=1).float()
    logits = torch.einsum("bhd,bhld->bhl", q[:, :, 0].float(), keys) * scaling
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    mass = logits.softmax(-1).sum(1)  # (B, L)
    L = keys.shape[2]
    rows = []
    for b in range(B):
        visible = [p for p in range(L) if valid[b, p]]
        start = visible[0]  # the row's sink is its first valid positions, after its padding
        forced = {p for p in visible if p < start + sink or p > L - 1 - window}
        rest = [p for p in mass[b].argsort(descending=True).tolist() if p in visible]
        rest = [p for p in rest if p not in forced]
        rows.append(forced | set(rest[: budget - len(forced)]))
    return rows


def read(selection, row: int, head: int) -> set[int]:
    return set(selection.indices[row, head][selection.valid[row, head]].tolist())


def key_valid(mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: the prompt's padding is invisible, every generated token visible."""
    ones = torch.ones(mask.shape[0], length - mask.shape[1], dtype=torch.bool)
    return torch.cat([mask.bool(), ones], 1)


@pytest.mark.parametrize("method", SAME_ROLES, ids=["tidaldecode", "delta"])
def test_reusing_layers_read_the_choice_of_their_selection_layer_at_each_step(method):
    model = build("llama", layers=5)
    ids, mask = left_padded_batch([70, 53], seed=1)
    calls = capture(method)
    with sparseattn.sparse_attention(model, decode=method, min_length=0):
        generate(model, ids, mask, steps=5)
    stats = sparseattn.last_stats(model)
    by_step: dict[int, dict[int, Call]] = {}
    for call in calls:
        by_step.setdefault(call.step, {})[call.layer] = call
    assert len(by_step) == 4  # steps after the first generated token
    chosen_per_step = []
    scaling = model.config.head_dim**-0.5
    for step, layers in by_step.items():
        assert sorted(layers) == list(range(5))
        for layer, role in ROLES.items():
            if role in ("dense", "select"):
                assert layers[layer].selection is None  # attends densely
                continue
            source = layers[role]
            valid = key_valid(mask, source.keys.shape[2])
            want = expected_positions(source.q, source.keys, valid, scaling, **KNOBS)
            for b in range(2):
                for h in range(2):  # one choice per row, read by every KV head
                    assert read(layers[layer].selection, b, h) == want[b]
            chosen_per_step.append(want)
    assert any(a != b for a, b in zip(chosen_per_step, chosen_per_step[2:]))  # steps differ
    assert stats.layer_methods("decode") == {
        0: "dense",
        1: "dense",
        2: method.name,
        3: "dense",
        4: method.name,
    }
    assert stats.counter(f"{method.name}_selections") == 2 * 2 * 4  # rows x layers x steps
    assert stats.counter(f"{method.name}_reuses") == 2 * 2 * 4


def test_sliding_layer_maps_the_chosen_positions_onto_its_ring():
    """Gemma 3 with a sliding layer between two full ones: the sliding layer reads the slots of
    its ring that hold a chosen position (and nothing else), the later full layer the chosen
    slots themselves."""
    model = build("gemma3", layer_types=["full_attention", "sliding_attention", "full_attention"])
    ids, mask = left_padded_batch([60, 47], seed=2)
    knobs = {"budget": 12, "sink": 0, "window": 2}
    method = TidalDecode(full_layers=0, reselect_layer=-1, **knobs)
    calls = capture(method)
    with sparseattn.sparse_attention(model, decode=method, min_length=0):
        generate(model, ids, mask, steps=4)
    scaling = model.config.query_pre_attn_scalar**-0.5
    steps = sorted({c.step for c in calls})
    assert len(steps) == 3
    mapped = 0
    for step in steps:
        layers = {c.layer: c for c in calls if c.step == step}
        source = layers[0]
        assert source.selection is None
        valid = key_valid(mask, source.keys.shape[2])
        want = expected_positions(source.q, source.keys, valid, scaling, **knobs)
        ring = layers[1].positions  # (B, 1, 24): the positions the sliding layer holds
        for b in range(2):
            held = {j for j, p in enumerate(ring[b, 0].tolist()) if p in want[b]}
            for h in range(2):
                assert read(layers[1].selection, b, h) == held
                assert read(layers[2].selection, b, h) == want[b]
            mapped += len(held)
            assert 0 < len(held) < len(want[b])  # some chosen tokens lie outside the window
    assert mapped > 0


def test_a_choice_is_read_only_by_later_layers_of_its_own_step():
    q, k, _, ctx = decode_call(kv_len=300, seed=3)
    method = TidalDecode(budget=32, full_layers=1, reselect_layer=-1)
    shared, counters = {}, {}

    def view(seen, keys=k):
        return DecodeView(keys, {}, 1, (0, 0), seen, shared, counters)

    at = dataclasses.replace
    assert method.select_decode(q, view(300), at(ctx, layer_idx=1)) is None  # selection layer
    published = shared[method.shared_key]
    assert published.step == 300 and published.layer == 1
    q2 = torch.randn_like(q)
    reused = method.select_decode(q2, view(300), at(ctx, layer_idx=2))
    for b in range(2):
        assert read(reused, b, 0) == set(published.positions[b].tolist())
    own = [set(p.tolist()) for p in choose_positions(q2, k, ctx, 32, 0, 0)[0]]
    assert own != [set(p.tolist()) for p in published.positions]  # the test can tell them apart
    # a later step finds the choice stale and chooses for itself
    k2 = torch.cat([k, torch.randn_like(k[:, :, :1])], 2)
    ctx2 = at(ctx, layer_idx=2, kv_len=301, q_offset=300)
    fresh = method.select_decode(q2, view(301, k2), ctx2)
    own2 = [set(p.tolist()) for p in choose_positions(q2, k2, ctx2, 32, 0, 0)[0]]
    assert [read(fresh, b, 0) for b in range(2)] == own2
    # a choice published by a later layer (a previous pass over the same step) is not read
    shared[method.shared_key] = Chosen(published.positions, published.valid, 300, layer=3)
    again = method.select_decode(q2, view(300), at(ctx, layer_idx=2))
    assert [read(again, b, 0) for b in range(2)] == own
    assert counters["tidaldecode_reuses"] == 2 and counters["tidaldecode_selections"] == 6


def test_choice_over_per_head_positions_equals_the_contiguous_choice():
    """A layer whose heads hold their tokens in different slot orders (per-head eviction) chooses
    the same positions as the contiguous layer, and each head reads the slots holding them."""
    torch.manual_seed(0)
    q, k, _, ctx = decode_call(kv_len=200, seed=4)
    positions, valid = choose_positions(q, k, ctx, 24, 2, 3)
    order = torch.stack([torch.randperm(200) for _ in range(4)]).view(2, 2, 200)  # (B, Hkv, L)
    k_perm = k.gather(2, order[..., None].expand(-1, -1, -1, k.shape[-1]))
    ctx_perm = dataclasses.replace(ctx, key_positions=order)
    positions_perm, valid_perm = choose_positions(q, k_perm, ctx_perm, 24, 2, 3)
    for b in range(2):
        assert set(positions_perm[b].tolist()) == set(positions[b].tolist())
    assert valid.all() and valid_perm.all()
    method = TidalDecode(budget=24, sink=2, window=3, full_layers=0, reselect_layer=-1)
    shared = {method.shared_key: Chosen(positions, valid, 200, layer=0)}
    view = DecodeView(k_perm, {}, 1, (0, 0), 200, shared, {})
    selection = method.select_decode(q, view, dataclasses.replace(ctx_perm, layer_idx=1))
    for b in range(2):
        for h in range(2):
            slots = selection.indices[b, h][selection.valid[b, h]]
            assert set(order[b, h, slots].tolist()) == set(positions[b].tolist())


def expected_by_position(call: Call, scaling: float, budget: int, window: int) -> list[set[int]]:
    """Per row, the chosen positions of a layer whose KV heads hold different positions, by hand:
    each query head's softmax over its KV head's held keys, added up by position over all heads;
    the last ``window`` positions and the current one first (no sink)."""
    B, Hq, _, _ = call.q.shape
    Hkv = call.keys.shape[1]
    query = call.step - 1
    rows = []
    for b in range(B):
        mass: dict[int, float] = {}
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            held = [j for j, p in enumerate(call.positions[b, kv].tolist()) if p <= query]
            logits = call.keys[b, kv, held].float() @ call.q[b, h, 0].float() * scaling
            for j, prob in zip(held, logits.softmax(-1).tolist()):
                p = int(call.positions[b, kv, j])
                mass[p] = mass.get(p, 0.0) + prob
        forced = {p for p in mass if p > query - window}
        rest = [p for p in sorted(mass, key=mass.get, reverse=True) if p not in forced]
        rows.append(forced | set(rest[: budget - len(forced)]))
    return rows


def test_heads_holding_different_positions_choose_and_read_by_position():
    """After a per-head eviction (KV head 0 keeps every other prompt token, head 1 the last 10),
    the selection layer adds the mass up by position and each head of the reusing layer reads
    the slots that hold a chosen position."""
    model = make_model("llama")
    ids, mask = left_padded_batch([60, 47], seed=13)
    method = TidalDecode(budget=12, window=3, full_layers=0, reselect_layer=-1)
    calls = capture(method)
    with sparseattn.sparse_attention(model, decode=method, evict=KeepPerHead(), min_length=0):
        generate(model, ids, mask, steps=4)
    scaling = model.config.head_dim**-0.5
    counts = []
    for step in sorted({c.step for c in calls}):
        source, reader = (next(c for c in calls if c.step == step and c.layer == i) for i in (0, 1))
        assert source.selection is None
        want = expected_by_position(source, scaling, 12, 3)
        for b in range(2):
            for h in range(2):
                held = reader.positions[b, h].tolist()
                slots = {j for j, p in enumerate(held) if p in want[b]}
                assert read(reader.selection, b, h) == slots
                counts.append(len(slots))
    assert min(counts) < 12 and max(counts) == 12  # a head reads only the positions it holds


# layer 0 selects (attends densely); the layers after it read a choice of every key: llama's
# layer 1 reads layer 0's; gemma3's sliding layer 0 sees a window only and publishes nothing,
# so its sliding layer 1 chooses over its ring and its full layer 2 chooses and reads
COVERING_ROLES = {
    "llama": {0: "dense", 1: "{name}"},
    "gemma3": {0: "dense", 1: "{name}", 2: "{name}"},
}


@pytest.mark.parametrize("lengths", [[70, 51], [70, 70]], ids=["padded", "unpadded"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", ["tidaldecode", "delta"])
def test_budget_covering_the_cache_equals_dense_generate(
    family, name, lengths, selection_over_every_key
):
    """Reusing layers that read a choice of every key decode exactly as dense."""
    model = make_model(family)
    ids, mask = left_padded_batch(lengths, seed=4)
    expected = generate(model, ids, mask)
    knobs = {"budget": covering_budget(ids, steps=8), "sink": 2, "window": 4, "full_layers": 0}
    if name == "tidaldecode":
        knobs["reselect_layer"] = -1  # the middle layer would select (and attend densely) too
    with sparseattn.sparse_attention(model, decode=name, decode_knobs=knobs, min_length=0):
        got = generate(model, ids, mask)
    stats = sparseattn.last_stats(model)
    roles = {layer: role.format(name=name) for layer, role in COVERING_ROLES[family].items()}
    assert stats.layer_methods("decode") == roles
    assert stats.density("decode") == 1.0  # every visible key read
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(
        torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("name", ["tidaldecode", "delta"])
def test_rows_are_independent_and_a_second_generate_starts_clean(name):
    model = build("llama", layers=3)
    ids, mask = left_padded_batch([60, 60], seed=5)
    knobs = {"budget": 20, "window": 4, "full_layers": 0}
    with sparseattn.sparse_attention(model, decode=name, decode_knobs=knobs, min_length=0):
        both = generate(model, ids, mask, steps=6)
        assert sparseattn.last_stats(model).counter(f"{name}_reuses") > 0
        alone = [generate(model, ids[i : i + 1], mask[i : i + 1], steps=6) for i in range(2)]
        again = generate(model, ids, mask, steps=6)
    for row in range(2):
        assert torch.equal(both.sequences[row], alone[row].sequences[0])
        torch.testing.assert_close(
            torch.stack(both.logits)[:, row],
            torch.stack(alone[row].logits)[:, 0],
            atol=1e-4,
            rtol=1e-4,
        )
    assert torch.equal(both.sequences, again.sequences)


FULL_SLIDING_FULL = ["full_attention", "sliding_attention", "full_attention"]
MODELS = {
    "llama": lambda: build("llama", layers=4),
    "gemma3-reuse-on-ring": lambda: build("gemma3", layer_types=FULL_SLIDING_FULL),
    "gemma3": lambda: make_model("gemma3"),  # sliding, sliding, full: the full layer chooses
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", ["tidaldecode", "delta"])
def test_decode_has_no_host_sync(model_name, name):
    model = MODELS[model_name]()
    ids, mask = left_padded_batch([120, 97], seed=6)
    knobs = {"budget": 20, "window": 4, "full_layers": 0}
    with sparseattn.sparse_attention(model, decode=name, decode_knobs=knobs, min_length=0):
        run = decode_steps(model, ids, mask)
    assert run.syncs == [[]] * 4
    stats = sparseattn.last_stats(model)
    assert 0 < stats.density("decode") < 0.8
    assert stats.counter(f"{name}_selections") > 0
    if model_name != "gemma3":  # there no layer after the full one: nothing to reuse
        assert stats.counter(f"{name}_reuses") > 0


def test_layer_roles_and_the_default_reselect_layer():
    config = tiny_config("llama")
    config.num_hidden_layers = 32
    tidal = TidalDecode()
    assert [i for i in range(32) if i >= 2 and tidal.selects(i)] == [2]  # unbound: no middle
    tidal.bind(config)
    assert [i for i in range(32) if i >= 2 and tidal.selects(i)] == [2, 16]
    delta = Delta()
    assert [i for i in range(32) if i >= 2 and delta.selects(i)] == [2, 14, 26]


def test_bad_knobs_are_named():
    with pytest.raises(UsageError, match="budget=10 is below what is always read"):
        TidalDecode(budget=10, sink=4, window=8)
    with pytest.raises(UsageError, match="budget=3 is below what is always read"):
        Delta(budget=3, window=4)
    with pytest.raises(UsageError, match="reselect_layer=2 must come after"):
        TidalDecode(reselect_layer=2)
    with pytest.raises(UsageError, match="reselect_layer='x' must be an integer"):
        TidalDecode(reselect_layer="x")
    with pytest.raises(UsageError, match="select_every=0 is out of range"):
        Delta(select_every=0)
    model = make_model("llama")  # 2 layers
    with pytest.raises(UsageError, match="reselect_layer=7 is past the model's last layer"):
        with sparseattn.sparse_attention(
            model, decode=TidalDecode(full_layers=0, reselect_layer=7)
        ):
            pass
    with pytest.raises(UsageError, match="full_layers=2 leaves no sparse layer"):
        with sparseattn.sparse_attention(model, decode="delta"):
            pass

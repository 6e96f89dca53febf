"""No host sync per decode step: every registered decode method, over a full cache and over the
caches eviction policies leave, for enough steps that every buffer grows while counted.

The buffers a decode step writes grow as tokens arrive: the cache layer's keys and values
(``cache/layers.py``), Quest's page bounds (twice the pages it was built with),
Double Sparsity's label cache (256 slots at a time). A 120-token prompt and 200 decode steps
outgrow each of them; a streaming cache never grows, and 64 steps overwrite its whole ring.
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, make_model
from syncs import decode_steps
from test_decode_double_sparsity import calibrated
from test_decode_methods import SPARSE, decode_methods

import sparseattn

torch.set_grad_enabled(False)

WARMUP = 1  # the first decode step builds the methods' state (on CUDA it may copy to the GPU)
EVICTIONS = {  # name: (sparse_attention keywords, decode steps)
    "full-cache": ({}, 200),
    "snapkv": ({"evict": "snapkv", "evict_knobs": {"compression": 0.25, "window": 8}}, 200),
    "streaming": ({"evict": "streaming", "evict_knobs": {"sink": 4, "window": 48}}, 64),
    "streaming-rerotate": (
        {"evict": "streaming", "evict_knobs": {"sink": 4, "window": 48, "rerotate": True}},
        64,
    ),
}
BUDGET = 16  # tokens: below the sliding layer's 24 slots, so every layer selects
# Quest's two forced pages leave a third page of the ring out at 8 tokens a page; the
# cross-layer methods select at layer 0 (attending densely) and read the choice at layer 1
TWO_LAYERS = {
    "quest": {"block_size": 8},
    "tidaldecode": {"full_layers": 0, "reselect_layer": -1},
    "delta": {"full_layers": 0},
}
CROSS_LAYER = {"tidaldecode", "delta"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# faiss searches on the host: on a GPU each step copies queries and keys there and back
HOST_BOUND = {"retrieval_attention"}


@pytest.fixture(scope="module")
def qwen2_channels(tmp_path_factory):
    """A channels profile of the test model, for double_sparsity."""
    return calibrated(make_model("qwen2"), tmp_path_factory.mktemp("syncs") / "qwen2.json")


def where(syncs: list[list[str]]) -> str:
    """'12 of 200 steps synced; step 3: aten._local_scalar_dense.default x2; ...'."""
    late = [(step, ops) for step, ops in enumerate(syncs) if ops and step >= WARMUP]
    shown = [f"step {step}: {', '.join(sorted(set(ops)))} x{len(ops)}" for step, ops in late[:3]]
    return f"{len(late)} of {len(syncs)} steps synced; " + "; ".join(shown)


def state_buffers(cache) -> dict[tuple[int, str], int]:
    """Slots of every preallocated buffer the decode methods keep with the cache layers."""
    return {
        (i, key): state.buffer.shape[2]
        for i, layer in enumerate(cache.layers)
        for key, state in getattr(layer, "state", {}).items()
        if isinstance(getattr(state, "buffer", None), torch.Tensor)
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eviction", list(EVICTIONS))
@pytest.mark.parametrize("name", decode_methods())
def test_decode_steps_never_sync(name, eviction, device, qwen2_channels, request):
    """No decode step reads a tensor value on the host (on CUDA, also under
    ``set_sync_debug_mode("error")``), while the cache and the methods' state grow."""
    if device == "cuda" and name in HOST_BOUND:
        reason = f"{name} searches on the host: one device sync per layer and step"
        request.applymarker(
            pytest.mark.xfail(strict=True, raises=(AssertionError, RuntimeError), reason=reason)
        )
    model = make_model("qwen2").to(device)  # layer 0 full, layer 1 a sliding ring
    ids, mask = (t.to(device) for t in left_padded_batch([120, 97], seed=6))
    knobs = {**SPARSE.get(name, {}), **TWO_LAYERS.get(name, {})}
    if "budget" in knobs:
        knobs["budget"] = BUDGET
    if name == "double_sparsity":
        knobs["profile"] = qwen2_channels
    setting, steps = EVICTIONS[eviction]
    warm: list[dict] = []

    def after_step(cache):
        if not warm:
            warm.append(state_buffers(cache))

    with sparseattn.sparse_attention(
        model, decode=name, decode_knobs=knobs, min_length=0, **setting
    ):
        run = decode_steps(model, ids, mask, steps, each_step=after_step, warmup=WARMUP)
    assert all(not ops for ops in run.syncs[WARMUP:]), where(run.syncs)
    methods = sparseattn.last_stats(model).layer_methods("decode")
    ran = {layer for layer, used in methods.items() if name in used.split("+")}
    assert ran == ({1} if name in CROSS_LAYER else {0, 1})  # the method ran, not only dense
    if setting.get("evict") == "streaming":
        return  # a bounded cache never grows
    assert 0 in run.grown  # the full layer outgrew its keys and values while counted
    now = state_buffers(run.cache)  # and so did the state kept with it (not the ring's)
    assert all(now[key] > slots for key, slots in warm[0].items() if key[0] == 0), (warm[0], now)

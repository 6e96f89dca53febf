"""DHSA, ProxyAttn and SALE: planted structure found as the oracle says, each method's own
building block against a hand-made case, dense at the dense limit, the backends agreeing."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, make_model
from test_backends import make_call

import sparseattn
from sparseattn.backends import BlockLayout
from sparseattn.methods.dhsa import chunk_ids, chunk_representations
from sparseattn.methods.oracle import true_tile_mass
from sparseattn.methods.proxyattn import proxy_members
from sparseattn.methods.sale import quantize_per_token
from sparseattn.registry import METHODS, build_method

torch.set_grad_enabled(False)

BLOCK = 32
SPARSE = {  # knobs that keep few tiles on the planted inputs
    "dhsa": {"budget": 64, "chunk": 16},
    "proxyattn": {"gamma": 0.7},
    "sale": {"threshold": 0.05, "local": 32},
}


def planted_call(hot_tile: int, length: int = 512, seed: int = 0):
    """Queries share a direction u; in batch row 0 the keys of one tile point along u."""
    q, k, v, ctx = make_call(length, length, batch=2, hq=4, hkv=2, d=16, seed=seed)
    u = torch.zeros(16)
    u[0] = 1.0
    q = 0.1 * q + 4.0 * u
    k = 0.1 * k
    k[0, :, hot_tile * BLOCK : (hot_tile + 1) * BLOCK] += 4.0 * u
    return q, k, v, ctx


@pytest.mark.parametrize("name", SPARSE)
def test_finds_the_tile_the_oracle_ranks_first(name):
    q, k, _v, ctx = planted_call(hot_tile=5)
    layout = BlockLayout(ctx, BLOCK)
    selection = build_method(name, block_size=BLOCK, **SPARSE[name]).select(q, k, ctx, layout)
    sel = selection.mask
    mass = true_tile_mass(q, k, ctx, layout)  # (B, H, nQ, nK) the exact attention
    top = mass[0, :, 6:].argmax(-1)  # (H, nQ - 6) each later query tile's heaviest key tile
    assert (top == 5).all(), "the oracle sees the planted tile"
    assert sel[0, :, 6:].gather(-1, top[..., None]).all(), "every later query tile keeps it"
    computed, visible = layout.density(selection)
    assert float(computed[0].sum() / visible[0].sum()) < 0.5, "and few others"


def test_dhsa_content_boundaries_fall_on_planted_changes():
    """Keys change direction at one position per window of 16: the cuts land exactly there."""
    cuts = [5, 20, 40, 50, 70, 90, 100, 120]
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(len(cuts) + 1, 16, generator=g)
    segment = torch.bucketize(torch.arange(128), torch.tensor(cuts), right=True)  # (128,)
    k = directions[segment] + 0.01 * torch.randn(128, 16, generator=g)
    k = k.expand(2, 2, 128, 16)  # (B, Hkv, Lk, D)
    ids = chunk_ids(k, 16, "content")  # (B, Lk)
    found = (ids[:, 1:] != ids[:, :-1]).nonzero()[:, 1] + 1
    assert found.view(2, -1).tolist() == [cuts, cuts]
    assert torch.equal(chunk_ids(k, 16, "fixed")[0], torch.arange(128) // 16)


def test_dhsa_chunk_representation_is_mean_times_sqrt_size():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, -1.0]])[None, None]  # (1, 1, 3, 2)
    ids = torch.tensor([[0, 0, 1]])
    reps, counts = chunk_representations(x, ids, torch.ones(1, 3), 2)
    torch.testing.assert_close(
        reps[0, 0], torch.tensor([[2.0, 2.0], [5.0, -1.0]]) * torch.tensor([[2**0.5], [1.0]])
    )
    assert counts.tolist() == [[2.0, 1.0]]
    reps, counts = chunk_representations(x, ids, torch.tensor([[0.0, 1.0, 1.0]]), 2)
    torch.testing.assert_close(reps[0, 0, 0], torch.tensor([3.0, 3.0]))  # padding left out


def test_proxyattn_heads_of_a_group_share_the_ranking_with_budgets_of_their_own():
    """Head 0 attends sharply, head 1 of the same KV head diffusely: one proxy ranks tiles for
    both, so in every query tile the sharper head's tiles are a prefix of the other's."""
    q, k, _v, ctx = planted_call(hot_tile=5)
    q[:, 1] = 0.25 * q[:, 1]  # head 1 (KV head 0): flatter attention, a larger budget
    layout = BlockLayout(ctx, BLOCK)
    sel = build_method("proxyattn", block_size=BLOCK, gamma=0.8).select(q, k, ctx, layout).mask
    sharp, flat = sel[0, 0], sel[0, 1]  # (nQ, nK)
    assert not (sharp & ~flat).any(), "the sharper head's tiles lie inside the flatter head's"
    assert flat.sum() > sharp.sum(), "each head keeps its own number of tiles"
    assert proxy_members(4, 2).tolist() == [0, 0, 1, 1]
    assert proxy_members(4, 3).tolist() == [0, 0, 1, 2]
    assert proxy_members(4, 8).tolist() == [0, 1, 2, 3]


def test_sale_quantizer_hand_case():
    codes, scale = quantize_per_token(torch.tensor([[1.4, -0.44, 0.26, 0.0]]), 4)
    assert codes.dtype == torch.int8 and codes.tolist() == [[7, -2, 1, 0]]
    torch.testing.assert_close(scale, torch.tensor([[0.2]]))
    codes, scale = quantize_per_token(torch.tensor([[0.7, 0.7, -0.7, 0.3]]), 4)
    assert codes.tolist() == [[7, 7, -7, 3]]  # 0.3 / 0.1 = 3
    codes, scale = quantize_per_token(torch.tensor([[1.27, -0.5]]), 8)
    assert codes.tolist() == [[127, -50]]
    codes, scale = quantize_per_token(torch.zeros(1, 4), 4)
    assert codes.tolist() == [[0, 0, 0, 0]] and scale.item() == 0.0


def sale_oracle(q, k, ctx, threshold: float, local: int) -> torch.Tensor:
    """(B, Hq, nQ, nK) tiles SALE keeps when its estimate is exact (float64, token by token)."""
    B, Hq, L, _ = q.shape
    n = L // BLOCK
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, 1))
    logits = logits * ctx.scaling
    pos = torch.arange(L)
    causal = pos[None, :] <= pos[:, None]
    q_tile, k_tile = pos[:, None] // BLOCK, pos[None, :] // BLOCK
    first_query = q_tile * BLOCK  # the local region is counted from a query tile's first query
    reference = (k_tile == 0) | ((k_tile + 1) * BLOCK - 1 >= first_query - local + 1)
    reference &= k_tile <= q_tile
    ref = logits.masked_fill(~(reference & causal), float("-inf"))
    top = ref.amax(-1, keepdim=True)
    total = (ref - top).exp().sum(-1, keepdim=True)
    above = ((logits - top).exp() / total >= threshold) & causal
    tiles = above.view(B, Hq, n, BLOCK, n, BLOCK).any(-1).any(3)
    return tiles | (reference & causal).view(1, 1, n, BLOCK, n, BLOCK).any(-1).any(3)


def test_sale_matches_the_exact_relative_score_oracle():
    q, k, _, ctx = planted_call(hot_tile=5)
    layout = BlockLayout(ctx, BLOCK)
    sel = build_method("sale", block_size=BLOCK, **SPARSE["sale"]).select(q, k, ctx, layout)
    assert torch.equal(sel.mask, sale_oracle(q, k, ctx, 0.05, 32))
    # random inputs: the 4-bit estimate agrees with the exact one on most tiles, 8 bits more
    q, k, _v, ctx = make_call(256, 256, batch=1, hq=4, hkv=2, d=16, seed=4)
    q = 2.0 * q
    layout = BlockLayout(ctx, BLOCK)
    exact = sale_oracle(q, k, ctx, 0.02, 32)
    agree = {}
    for bits in (4, 8):
        method = build_method("sale", block_size=BLOCK, threshold=0.02, local=32, bits=bits)
        agree[bits] = float((method.select(q, k, ctx, layout).mask == exact).float().mean())
    assert agree[4] > 0.9 and agree[8] >= agree[4]
    assert exact.float().mean() < 0.9, "the oracle itself is sparse here"


@pytest.mark.parametrize("name", SPARSE)
def test_dense_limit_equals_dense_through_the_hook(name):
    """A left-padded batch on a model with its own sliding window: at the dense-limit knobs the
    reference backend's logits are the model's own."""
    model = make_model("mistral")
    ids, mask = left_padded_batch([83, 52], seed=2)
    expected = model(input_ids=ids, attention_mask=mask).logits
    knobs = {"min_length": 0, "block_size": 16, "prefill_backend": "reference"}
    with sparseattn.sparse_attention(model, name, **knobs, **METHODS[name].dense_limit):
        got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)


HOOK_SPARSE = {  # knobs sparse at the tiny model's lengths (tiles of 16)
    "dhsa": {"budget": 32, "chunk": 8},
    "proxyattn": {"gamma": 0.5},
    "sale": {"threshold": 0.2, "local": 16},
}


def chunked_logits(model, ids, mask, backend: str, name: str):
    """Prompt in two chunks through one cache (the second with q_offset > 0); logits, density."""
    knobs = dict(min_length=0, block_size=16, prefill_backend=backend, **HOOK_SPARSE[name])
    with sparseattn.sparse_attention(model, name, **knobs):
        first = model(input_ids=ids[:, :60], attention_mask=mask[:, :60])
        second = model(
            input_ids=ids[:, 60:], attention_mask=mask, past_key_values=first.past_key_values
        )
        density = sparseattn.last_stats(model).density("prefill")
    return torch.cat([first.logits, second.logits], 1), density


@pytest.mark.parametrize("name", SPARSE)
def test_backends_agree_on_a_sparse_chunked_prefill(name):
    model = make_model("mistral")
    ids, mask = left_padded_batch([83, 52], seed=2)
    expected, density = chunked_logits(model, ids, mask, "reference", name)
    assert density < 1.0, "the setting is sparse"
    keep = mask.bool()
    for backend in ("cpp", "flex"):
        got, _ = chunked_logits(model, ids, mask, backend, name)
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)

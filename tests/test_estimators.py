"""Estimators with grouped-query attention: equal to keys repeated per query head, never copying them."""

from __future__ import annotations

import pytest
import torch
from test_backends import make_call
from torch.utils._python_dispatch import TorchDispatchMode

from sparseattn.backends import BlockLayout
from sparseattn.backends.masks import base_token_mask
from sparseattn.methods.estimators import last_query_probs
from sparseattn.methods.oracle import true_tile_mass
from sparseattn.registry import build_method

GROUPS = [1, 2, 4]


def gqa_call(groups: int, q_len: int = 200, kv_len: int = 200, **options):
    """A call with 2 KV heads and ``groups`` query heads per KV head, padding in batch row 1."""
    return make_call(q_len, kv_len, hq=2 * groups, hkv=2, pad=(0, 30), seed=groups, **options)


def repeated_key_probs(q, k, ctx, start: int, stop: int) -> torch.Tensor:
    """The former formula: every query head against an fp32 copy of its KV head's keys."""
    kf = k.float().repeat_interleave(ctx.groups, dim=1)  # (B, Hq, Lk, D)
    scores = torch.matmul(q[:, :, start:stop].float(), kf.transpose(-1, -2)) * ctx.scaling
    scores = scores.masked_fill(~base_token_mask(ctx, start, stop), float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)  # (B, Hq, stop - start, Lk)


@pytest.mark.parametrize("window", [None, 48])
@pytest.mark.parametrize("groups", GROUPS)
def test_last_query_probs_equal_the_repeated_key_formula(groups, window):
    q, k, _, ctx = gqa_call(groups, window=window)
    want = repeated_key_probs(q, k, ctx, ctx.q_len - 40, ctx.q_len)
    torch.testing.assert_close(last_query_probs(q, k, ctx, 40), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("groups", GROUPS)
def test_true_tile_mass_equals_the_repeated_key_formula(groups):
    q, k, _, ctx = gqa_call(groups, q_len=96, kv_len=300)  # a chunk after a prefix
    layout = BlockLayout(ctx, 32)
    probs = repeated_key_probs(q, k, ctx, 0, ctx.q_len)  # (B, Hq, Lq, Lk)
    probs = torch.nn.functional.pad(probs, (0, layout.n_kv_blocks * 32 - ctx.kv_len))
    per_key_tile = probs.view(*probs.shape[:3], layout.n_kv_blocks, 32).sum(-1)
    want = torch.zeros(ctx.batch, ctx.num_q_heads, layout.n_q_blocks, layout.n_kv_blocks)
    want.index_add_(2, torch.arange(ctx.q_len) // 32, per_key_tile)
    torch.testing.assert_close(true_tile_mass(q, k, ctx, layout), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", GROUPS)
def test_block_sparse_equals_pooled_keys_repeated_per_head(groups):
    from sparseattn.methods.estimators import pool_blocks

    q, k, _, ctx = gqa_call(groups)
    layout = BlockLayout(ctx, 32)
    qp = pool_blocks(q, ctx.q_len, 32)  # (B, Hq, nQ, D)
    kp = pool_blocks(k, ctx.kv_len, 32).repeat_interleave(ctx.groups, dim=1)  # (B, Hq, nK, D)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * ctx.scaling
    scores = scores.masked_fill(~layout.visible[:, None], float("-inf"))
    top = scores.softmax(-1).topk(3, dim=-1).indices
    want = layout.finalize(torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True))
    got = build_method("block_sparse", block_size=32, top_k=3).select(q, k, ctx, layout)
    assert torch.equal(got.mask, want.mask)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def minference_profile(tmp_path_factory) -> str:
    """A profile for gqa_call(4): vertical_slash on every head but one, block_sparse on head 7."""
    from sparseattn.profiles import save_profile

    path = tmp_path_factory.mktemp("profile") / "gqa.json"
    fp = {"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 8}
    save_profile(
        path,
        kind="minference",
        model={"id": "test", **fp, "num_key_value_heads": 2, "head_dim": 16},
        calibration={},
        choices=[
            {"pattern": "vertical_slash", "knobs": {"vertical_size": 16, "slash_size": 16}},
            {"pattern": "block_sparse", "knobs": {"top_k": 2}},
        ],
        heads={0.5: [[0, 0, 0, 0, 0, 0, 0, 1]]},
        summary={0.5: {"recall": [0.0], "density": [0.0]}},
    )
    return str(path)


ESTIMATES = {
    "last_query_probs": lambda q, k, ctx, layout: last_query_probs(q, k, ctx, 40),
    "true_tile_mass": true_tile_mass,
    "block_sparse": build_method("block_sparse", block_size=32).select,
    "flexprefill": build_method("flexprefill", block_size=32).select,
    "vertical_slash": build_method("vertical_slash", block_size=32).select,
}


@pytest.mark.parametrize("estimate", [*ESTIMATES, "minference"])
def test_keys_are_not_copied_per_query_head(estimate, tmp_path_factory):
    """No intermediate holds the keys (or the pooled keys) once per query head."""
    q, k, _, ctx = gqa_call(4, q_len=96, kv_len=300)  # Lq != Lk: no query shape looks like K
    layout = BlockLayout(ctx, 32)
    if estimate == "minference":  # the heads of one pattern run together: 7 of them here
        profile = minference_profile(tmp_path_factory)
        run = build_method("minference", block_size=32, budget=0.5, profile=profile).select
    else:
        run = ESTIMATES[estimate]
    B, D = ctx.batch, q.shape[-1]
    per_head = set()
    for H in range(3, ctx.num_q_heads + 1):  # more heads than KV heads: some copied
        for n in (ctx.kv_len, layout.n_kv_blocks):
            per_head |= {(B, H, n, D), (B, H, D, n)}  # keys or pooled keys, maybe transposed
    with _Shapes() as seen:
        run(q, k.to(torch.bfloat16), ctx, layout)
    assert not seen.shapes & per_head, f"keys repeated per query head: {seen.shapes & per_head}"


def test_minference_heads_of_one_pattern_equal_each_head_alone(tmp_path_factory):
    """Grouping a pattern's heads by KV head changes nothing: each head selects as if alone."""
    import dataclasses

    q, k, _, ctx = gqa_call(4, q_len=96, kv_len=300)
    layout = BlockLayout(ctx, 32)
    profile = minference_profile(tmp_path_factory)
    got = build_method("minference", block_size=32, budget=0.5, profile=profile)
    got = got.select(q, k, ctx, layout).mask
    one = dataclasses.replace(ctx, num_q_heads=1, num_kv_heads=1)
    for head in range(ctx.num_q_heads):
        pattern = "block_sparse" if head == 7 else "vertical_slash"
        knobs = {"top_k": 2} if head == 7 else {"vertical_size": 16, "slash_size": 16}
        alone = build_method(pattern, block_size=32, **knobs)
        kv = head // ctx.groups
        want = alone.select(q[:, head : head + 1], k[:, kv : kv + 1], one, layout).mask
        assert torch.equal(got[:, head], want[:, 0]), head

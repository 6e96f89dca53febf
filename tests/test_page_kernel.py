"""The C++ page decode kernel equals softmax attention over the slots it is told to read, on
views of a larger cache buffer, with pages in any order, a tail, GQA rows and batch > 1; the
gather path without the kernel gives the same result."""

from __future__ import annotations

import pytest
import torch

from sparseattn.backends import cpp
from sparseattn.backends.gather import gather_pages_attend
from sparseattn.types import AttentionContext, PageSelection, Phase


@pytest.fixture(scope="module")
def kernel():
    if cpp.compiler() is None:
        pytest.skip("no C++ compiler on this machine: the gather path covers decode")
    assert cpp.available(), f"the C++ kernels did not build: {cpp.reason()}"


def case(seed: int):
    g = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    B, Hkv, groups, D, P = pick(1, 2, 4), pick(1, 2, 3), pick(1, 3, 4), pick(8, 64), pick(8, 16)
    held = int(torch.randint(3 * P, 12 * P, (1,), generator=g))
    capacity = held + pick(0, 5, 40)
    k_buf, v_buf = (
        torch.randn(B, Hkv, capacity, D, generator=g),
        torch.randn(B, Hkv, capacity, D, generator=g),
    )
    k, v = k_buf[:, :, :held], v_buf[:, :, :held]  # views of the buffer, as the cache holds them
    q = torch.randn(B, Hkv * groups, 1, D, generator=g)
    current = (held - 1) // P * P
    n = int(torch.randint(1, current // P + 1, (1,), generator=g))
    pages = torch.stack(
        [
            torch.stack([torch.randperm(current // P, generator=g)[:n] for _ in range(Hkv)])
            for _ in range(B)
        ]
    )
    return q, k, v, pages, P, (current, held)


def expected(q, k, v, pages, P, tail, scale):
    """Softmax over exactly the slots of the pages and the tail, per row and query head."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty(B, 1, Hq, v.shape[-1])
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            slots = torch.cat(
                [(pages[b, kv, :, None] * P + torch.arange(P)).flatten(), torch.arange(*tail)]
            )
            weights = torch.softmax(k[b, kv, slots].double() @ q[b, h, 0].double() * scale, 0)
            out[b, 0, h] = (weights[:, None] * v[b, kv, slots].double()).sum(0).float()
    return out


def context(q, k) -> AttentionContext:
    B, Hq, _, D = q.shape
    return AttentionContext(
        layer_idx=0, phase=Phase.DECODE, batch=B, q_len=1, kv_len=k.shape[2],
        q_offset=k.shape[2] - 1, kv_offset=0, num_q_heads=Hq, num_kv_heads=k.shape[1],
        scaling=D**-0.5,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(12))
def test_page_kernel_equals_softmax_over_the_read_slots(kernel, seed):
    q, k, v, pages, P, tail = case(seed)
    ctx = context(q, k)
    B, Hq, _, D = q.shape
    rows = q.view(B, k.shape[1], Hq // k.shape[1], D)
    got = cpp.page_decode(rows, k, v, pages, P, tail, ctx.scaling)  # (B, Hkv, g, Dv)
    got = got.reshape(B, Hq, 1, -1).transpose(1, 2)
    torch.testing.assert_close(
        got, expected(q, k, v, pages, P, tail, ctx.scaling), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("seed", range(4))
def test_gather_path_with_and_without_the_kernel_agree(kernel, seed, monkeypatch):
    q, k, v, pages, P, tail = case(seed)
    ctx = context(q, k)
    selection = PageSelection(
        pages=pages, valid=torch.ones_like(pages, dtype=torch.bool), page_size=P, tail=tail,
        all_valid=True,
    )  # fmt: skip
    with_kernel = gather_pages_attend(q, k, v, selection, ctx)
    monkeypatch.setenv("SPARSEATTN_CPP", "0")  # runs_on() is False: index_select + SDPA
    without = gather_pages_attend(q, k, v, selection, ctx)
    torch.testing.assert_close(with_kernel, without, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        with_kernel, expected(q, k, v, pages, P, tail, ctx.scaling), atol=1e-5, rtol=1e-4
    )


def test_page_kernel_refuses_bad_inputs(kernel):
    q, k, v, pages, P, tail = case(0)
    B, Hq, _, D = q.shape
    rows = q.view(B, k.shape[1], -1, D)
    with pytest.raises(RuntimeError, match="int64 pages"):
        cpp.page_decode(rows, k, v, pages.int(), P, tail, 0.1)
    with pytest.raises(RuntimeError, match="tail outside the held slots"):
        cpp.page_decode(rows, k, v, pages, P, (tail[0], k.shape[2] + 1), 0.1)


@pytest.mark.parametrize(
    "B, Hkv, g, D, held",
    [(1, 3, 3, 64, 1000), (2, 2, 4, 8, 333), (1, 1, 5, 12, 129), (3, 2, 1, 32, 7)],
)
def test_dense_decode_through_the_kernel_equals_sdpa(kernel, monkeypatch, B, Hkv, g, D, held):
    """Dense decode over every held key (the kernel's tail, in blocks; vector and portable
    forms by D) equals PyTorch's SDPA on the same cache view."""
    from sparseattn.backends.sdpa import dense_decode

    gen = torch.Generator().manual_seed(held)
    k_buf, v_buf = (torch.randn(B, Hkv, held + 50, D, generator=gen) for _ in range(2))
    k, v = k_buf[:, :, :held], v_buf[:, :, :held]
    q = torch.randn(B, Hkv * g, 1, D, generator=gen)
    ctx = context(q, k)
    with_kernel = dense_decode(q, k, v, ctx, all_visible=True)
    monkeypatch.setenv("SPARSEATTN_CPP", "0")
    sdpa = dense_decode(q, k, v, ctx, all_visible=True)
    torch.testing.assert_close(with_kernel, sdpa, atol=1e-5, rtol=1e-4)
    tail = (0, held)
    none = torch.empty(B, Hkv, 0, dtype=torch.long)
    torch.testing.assert_close(
        with_kernel, expected(q, k, v, none, 16, tail, ctx.scaling), atol=1e-5, rtol=1e-4
    )

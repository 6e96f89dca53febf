"""Kernel benchmark: block-sparse kernels vs dense attention at the same shape, same run.

Shape defaults to SmolLM2-135M's attention (9 query heads, 3 KV heads, head dim 64). Dense is
timed twice per kernel: SDPA with ``is_causal`` (what the model itself runs, the baseline of
every speedup) and the kernel itself with every causal tile ("dense through the sparse path"),
so a record separates the gain of skipping tiles from the difference between kernels. The
efficiency of a record is its speedup over SDPA divided by the ideal speedup 1 / density.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backends import BlockLayout, flex_attend
from ..backends.tiles import attend_tiles, random_tiles, tile_kernel
from ..integration.stats import timed
from ..types import AttentionContext, Phase


@dataclass(frozen=True)
class KernelShape:
    num_q_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 128
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = timed(device)
        fn()
        times.append(timed(device) - start)
    return statistics.median(times)


def prefill_context(length: int, shape: KernelShape) -> AttentionContext:
    return AttentionContext(
        layer_idx=0,
        phase=Phase.PREFILL,
        batch=1,
        q_len=length,
        kv_len=length,
        q_offset=0,
        kv_offset=0,
        num_q_heads=shape.num_q_heads,
        num_kv_heads=shape.num_kv_heads,
        scaling=shape.head_dim**-0.5,
        device=torch.device(shape.device),
    )


def kernels_to_run(requested: list[str], shape: KernelShape) -> list[str]:
    """``requested`` with ``auto`` resolved for this shape (duplicates dropped, order kept)."""
    probe_ctx = prefill_context(shape.block_size, shape)
    probe = torch.empty(0, dtype=shape.dtype, device=shape.device)
    chosen = [tile_kernel(name, probe, probe_ctx) for name in requested]
    return list(dict.fromkeys(chosen))


def run_kernel_bench(
    lengths: list[int],
    densities: list[float],
    shape: KernelShape,
    repeats: int = 3,
    seed: int = 0,
    kernels: list[str] | None = None,
) -> Iterator[dict]:
    """Yield one record per (length, kernel, density), every time from the same run.

    Args:
        kernels: Backends to time ("auto", "cpp", "flex"); default the one ``auto`` picks,
            then flex.
    """
    kernels = kernels_to_run(kernels or ["auto", "flex"], shape)
    g = torch.Generator().manual_seed(seed)
    for length in lengths:
        ctx = prefill_context(length, shape)
        q = torch.randn(1, shape.num_q_heads, length, shape.head_dim, generator=g).to(
            shape.device, shape.dtype
        )
        k = torch.randn(1, shape.num_kv_heads, length, shape.head_dim, generator=g).to(
            shape.device, shape.dtype
        )
        v = torch.randn_like(k)
        layout = BlockLayout(ctx, shape.block_size)
        every = layout.every_tile(shape.num_q_heads)
        dense_s = _timed(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            repeats,
            shape.device,
        )
        selections = [layout.finalize(random_tiles(layout, d, seed)) for d in densities]
        for kernel in kernels:

            def run(selection, kernel=kernel):
                return attend_tiles(kernel, q, k, v, selection, ctx, layout)

            kernel_dense_s = _timed(lambda: run(every), repeats, shape.device)
            for density, selection in zip(densities, selections):
                computed, visible = layout.density(selection)
                measured = float(computed.sum() / visible.sum())
                sparse_s = _timed(lambda: run(selection), repeats, shape.device)
                speedup = dense_s / sparse_s
                yield {
                    "length": length,
                    "kernel": kernel,
                    "target_density": density,
                    "density": round(measured, 4),
                    "dense_s": round(dense_s, 5),
                    "kernel_dense_s": round(kernel_dense_s, 5),
                    "dense_ratio": round(dense_s / kernel_dense_s, 3),
                    "sparse_s": round(sparse_s, 5),
                    "speedup": round(speedup, 3),
                    "speedup_vs_kernel_dense": round(kernel_dense_s / sparse_s, 3),
                    "ideal_speedup": round(1.0 / measured, 3),
                    "efficiency": round(speedup * measured, 3),
                    "block_size": shape.block_size,
                    "device": shape.device,
                    "threads": torch.get_num_threads(),
                }


def compile_report(lengths: list[int], shape: KernelShape) -> dict:
    """Time the first (compiling) call and count compiled graphs over a run of varied lengths."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    first_calls = []
    for length in lengths:
        ctx = prefill_context(length, shape)
        q = torch.randn(1, shape.num_q_heads, length, shape.head_dim).to(shape.device, shape.dtype)
        k = torch.randn(1, shape.num_kv_heads, length, shape.head_dim).to(shape.device, shape.dtype)
        layout = BlockLayout(ctx, shape.block_size)
        sel = layout.finalize(random_tiles(layout, 0.3, 0))
        start = timed(shape.device)
        flex_attend(q, k, k, sel, ctx, layout)
        first_calls.append(round(timed(shape.device) - start, 3))
    return {
        "kind": "compile",
        "lengths": lengths,
        "first_call_s": first_calls,
        "compiled_graphs": counters["stats"]["unique_graphs"] - before,
    }

"""Decode benchmark: seconds per generated token, dense vs a method, after the same prompt."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache

from ..integration.hf import sparse_attention
from .prefill import benchmark_input


def _decode_steps(model, cache: DynamicCache, first: torch.Tensor, steps: int) -> float:
    """Seconds per step of greedy decoding ``steps`` tokens from ``cache``."""
    next_id = first
    if first.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=next_id, past_key_values=cache, use_cache=True)
        next_id = out.logits[:, -1:].argmax(-1)
    if first.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def run_decode_bench(
    model,
    tokenizer,
    method: str,
    knobs: dict[str, Any],
    lengths: list[int],
    *,
    steps: int = 32,
    hook_options: dict[str, Any] | None = None,
    seed: int = 0,
) -> Iterator[dict]:
    """Yield one record per prompt length: dense and sparse seconds per token, measured density.

    The prompt is prefilled once densely; dense and sparse decoding each start from a copy of
    that cache, so both attend to the same context.
    """
    options = {"min_length": 0, **(hook_options or {})}
    device = next(model.parameters()).device
    for length in lengths:
        ids = benchmark_input(tokenizer, length, seed).to(device)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1:].argmax(-1)
        _decode_steps(model, copy.deepcopy(cache), first, 2)  # warm-up
        dense_s = _decode_steps(model, copy.deepcopy(cache), first, steps)
        with sparse_attention(model, method, **knobs, **options) as stats:
            _decode_steps(model, copy.deepcopy(cache), first, 2)  # warm-up
            sparse_s = _decode_steps(model, copy.deepcopy(cache), first, steps)
        yield {
            "model": str(model.config._name_or_path),
            "method": method,
            "knobs": knobs,
            "length": length,
            "dense_s_per_token": round(dense_s, 5),
            "sparse_s_per_token": round(sparse_s, 5),
            "speedup": round(dense_s / sparse_s, 3),
            "decode_density": round(stats.density("decode") or 1.0, 4),
            "steps": steps,
            "device": str(device),
        }

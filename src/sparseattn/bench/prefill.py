"""End-to-end prefill benchmark: one model, dense (the model's own sdpa) vs a method, same run."""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import torch

from ..integration.hf import sparse_attention
from ..integration.plan import HookOptions
from ..integration.stats import timed
from ..setting import Setting


def benchmark_input(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """(1, length) token ids: the label-free fidelity text when the task suite is installed."""
    try:
        from .tasks import build_task

        ids = build_task("fidelity").generate(tokenizer, length, seed, 0).input_ids
        return torch.tensor([ids])
    except (ImportError, ValueError):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(10, len(tokenizer), (1, length), generator=g)


def _time_forward(model, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = timed(ids.device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        times.append(timed(ids.device) - start)
    return statistics.median(times)


@torch.inference_mode()
def run_prefill_bench(
    model,
    tokenizer,
    setting: Setting,
    lengths: list[int],
    *,
    repeats: int = 1,
    warmup_length: int = 1024,
    options: HookOptions | None = None,
    seed: int = 0,
) -> Iterator[dict]:
    """Yield one record per length: dense_s, sparse_s, speedup, measured density, time shares.

    Every forward keeps the logits of the last position only, as generation does.

    ``dense_s`` is the model's own sdpa path outside the hook. ``dense_attention_s`` is the time
    spent in attention by a dense pass through the hook, so ``select_share`` (estimation time
    over dense attention time) can be judged against the attention budget.
    """
    options = options or HookOptions(min_length=0)
    hook = {**setting.hook_kwargs(), **options.kwargs()}
    device = next(model.parameters()).device
    warm = benchmark_input(tokenizer, warmup_length, seed).to(device)
    model(input_ids=warm, use_cache=False, logits_to_keep=1)
    with sparse_attention(model, **hook):
        model(
            input_ids=warm, use_cache=False, logits_to_keep=1
        )  # compiles the kernel once (dynamic shapes)
    for length in lengths:
        ids = benchmark_input(tokenizer, length, seed).to(device)
        dense_s = _time_forward(model, ids, repeats)
        with sparse_attention(model, "dense", min_length=0, timing=True) as dense_stats:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        # on CPU the per-layer timers cost nothing; on CUDA they synchronize, so the timed run
        # goes without them and one more pass measures the selection / attention shares
        on_cpu = device.type == "cpu"
        with sparse_attention(model, **{**hook, "timing": on_cpu}) as stats:
            sparse_s = _time_forward(model, ids, repeats)
        if not on_cpu:
            with sparse_attention(model, **{**hook, "timing": True}) as stats:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        seconds = stats.seconds("prefill")  # of the last repeat: a new prompt resets the stats
        dense_attention_s = dense_stats.seconds("prefill")["attend_s"]
        yield {
            "model": str(model.config._name_or_path),
            "setting": setting.label,
            "length": length,
            "dense_s": round(dense_s, 4),
            "sparse_s": round(sparse_s, 4),
            "speedup": round(dense_s / sparse_s, 3),
            "density": round(stats.density("prefill"), 4),
            "select_s": round(seconds["select_s"], 4),
            "attend_s": round(seconds["attend_s"], 4),
            "dense_attention_s": round(dense_attention_s, 4),
            "select_share": round(seconds["select_s"] / max(dense_attention_s, 1e-9), 4),
            "attention_share_of_dense_prefill": round(dense_attention_s / dense_s, 4),
            "repeats": repeats,
            "device": str(device),
        }

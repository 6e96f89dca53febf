"""End-to-end prefill benchmark: one model, dense (the model's own sdpa) vs a method, same run."""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import torch

from ..integration.hf import sparse_attention
from ..integration.options import HookOptions
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
    """Yield one record per length, then one ``kind="crossover"`` record for the setting.

    Every forward keeps the logits of the last position only, as generation does. Three passes
    per length, in the same run: the model's own sdpa outside the hook (``dense_s``, the
    baseline of ``speedup``), ``dense`` through the hook (``hook_dense_s``: the library's own
    dense path, where sliding-window layers run as windows; ``speedup_vs_hook_dense``) and the
    setting (``sparse_s``). ``dense_attention_s`` is the time the hook's dense pass spent in
    attention, so ``select_share`` (estimation over dense attention) can be judged against
    the attention budget. The crossover record names the shortest measured length from which
    the setting is faster than the model's own dense path at every longer length measured
    (None if it never is).
    """
    options = options or HookOptions(min_length=0)
    hook = {**setting.hook_kwargs(), **options.kwargs()}
    dense_hook = {**options.kwargs(), "prefill": "dense", "decode": "dense"}
    device = next(model.parameters()).device
    warm = benchmark_input(tokenizer, warmup_length, seed).to(device)
    model(input_ids=warm, use_cache=False, logits_to_keep=1)
    for kwargs in (hook, dense_hook):  # compiles / builds the kernels once (dynamic shapes)
        with sparse_attention(model, **kwargs):
            model(input_ids=warm, use_cache=False, logits_to_keep=1)
    on_cpu = device.type == "cpu"
    speedups = []
    for length in lengths:
        ids = benchmark_input(tokenizer, length, seed).to(device)
        dense_s = _time_forward(model, ids, repeats)
        with sparse_attention(model, **dense_hook):
            hook_dense_s = _time_forward(model, ids, repeats)
        with sparse_attention(model, **{**dense_hook, "timing": True}) as dense_stats:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        # on CPU the per-layer timers cost nothing; on CUDA they synchronize, so the timed run
        # goes without them and one more pass measures the selection / attention shares
        with sparse_attention(model, **{**hook, "timing": on_cpu}) as stats:
            sparse_s = _time_forward(model, ids, repeats)
        if not on_cpu:
            with sparse_attention(model, **{**hook, "timing": True}) as stats:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        seconds = stats.seconds("prefill")  # of the last repeat: a new prompt resets the stats
        dense_attention_s = dense_stats.seconds("prefill")["attend_s"]
        speedups.append(dense_s / sparse_s)
        yield {
            "model": str(model.config._name_or_path),
            "setting": setting.label,
            "length": length,
            "dense_s": round(dense_s, 4),
            "hook_dense_s": round(hook_dense_s, 4),
            "sparse_s": round(sparse_s, 4),
            "speedup": round(dense_s / sparse_s, 3),
            "speedup_vs_hook_dense": round(hook_dense_s / sparse_s, 3),
            "hook_dense_speedup": round(dense_s / hook_dense_s, 3),
            "density": round(stats.density("prefill"), 4),
            "select_s": round(seconds["select_s"], 4),
            "attend_s": round(seconds["attend_s"], 4),
            "dense_attention_s": round(dense_attention_s, 4),
            "select_share": round(seconds["select_s"] / max(dense_attention_s, 1e-9), 4),
            "attention_share_of_dense_prefill": round(dense_attention_s / dense_s, 4),
            "prefill_backend": options.prefill_backend,
            "min_length": options.min_length,
            "repeats": repeats,
            "device": str(device),
        }
    yield {
        "kind": "crossover",
        "model": str(model.config._name_or_path),
        "setting": setting.label,
        "lengths": list(lengths),
        "speedups": [round(x, 3) for x in speedups],
        "crossover_length": crossover_length(lengths, speedups),
    }


def crossover_length(lengths: list[int], speedups: list[float]) -> int | None:
    """The shortest length from which every speedup (at it and every longer length) is >= 1."""
    pairs = sorted(zip(lengths, speedups))
    for i, (length, _) in enumerate(pairs):
        if all(s >= 1.0 for _, s in pairs[i:]):
            return length
    return None

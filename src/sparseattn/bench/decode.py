"""Decode benchmark: seconds per generated token, transformers' own SDPA vs the hook's dense path
vs one or more settings, in one run, each from its own prefill of the same prompt; with KV bytes
and peak memory per setting (its own prefill and its decode steps), and the ceiling (dense decode
over a cache of the size the setting keeps).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from ..cache import cache_nbytes
from ..compat import cache_kwargs
from ..integration.hf import sparse_attention
from ..integration.options import HookOptions
from ..integration.stats import DECODE_WARMUP, per_token_seconds, timed
from ..setting import Setting
from .peak import PeakMemory
from .prefill import benchmark_input

DENSE = Setting()


def prefill_cache(model, ids: torch.Tensor, batch: int) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill one prompt densely (the model's own path) and repeat it ``batch`` times."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache, out.logits[:, -1:].argmax(-1).expand(batch, 1).contiguous()


def decode_steps(model, cache, first: torch.Tensor, steps: int) -> float:
    """Seconds per greedy step over ``steps`` steps after the warm-up ones (the rule the
    frontier uses too: ``per_token_seconds``)."""
    token, times = first, []
    for _ in range(DECODE_WARMUP + steps):
        start = timed(token.device)
        out = model(input_ids=token, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        times.append(timed(token.device) - start)
    return per_token_seconds(times)


def run_setting(
    model, setting: Setting, prompt: torch.Tensor, batch: int, steps: int, options: HookOptions
) -> dict[str, Any]:
    """Prefill ``prompt`` (repeated ``batch`` times) and decode ``steps`` tokens under
    ``setting``, both inside one peak-memory scope: the peak is the setting's own prefill (its
    prefill method, its eviction policy's compaction) and its decode steps; the seconds are the
    decode steps' alone."""
    device = prompt.device
    with (
        PeakMemory(device) as peak,
        sparse_attention(
            model, **setting.hook_kwargs(), **{**options.kwargs(), "timing": device.type == "cpu"}
        ) as stats,
    ):
        work, first = prefill_cache(model, prompt, batch)
        seconds = decode_steps(model, work, first, steps)
        kv_bytes = cache_nbytes(work)
        held = [layer.get_seq_length() for layer in work.layers]
        kept = max(mean_held(layer) for layer in work.layers)
    decode = stats.seconds("decode")
    return {
        "s_per_token": seconds,
        "kv_bytes": kv_bytes,
        "kept_tokens": kept,
        "seen_tokens": max(held),
        "density": stats.density("decode"),
        "select_share": decode["select_s"] / max(decode["select_s"] + decode["attend_s"], 1e-12),
        "counters": {name: stats.counter(name) for name in sorted(stats.counters)},
        "activation": None if stats.activation is None else stats.activation.summary(),
        "peak_mb": peak.peak_mb,
        "peak_added_mb": None if peak.peak_mb is None else peak.peak_mb - (peak.start_mb or 0.0),
    }


@torch.inference_mode()
def run_decode_bench(
    model,
    tokenizer,
    setting: Setting | Sequence[Setting],
    lengths: list[int],
    *,
    batches: tuple[int, ...] = (1,),
    steps: int = 16,
    options: HookOptions | None = None,
    ceiling: bool = True,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """One record per (length, batch, setting): seconds per token of transformers' SDPA, of the hook's
    dense path and of ``setting``, their ratios, KV bytes and per-setting peak memory.

    Every measurement (transformers' SDPA, the hook's dense path, each setting, each ceiling)
    prefills the same prompt itself (once, repeated over the batch) and decodes from that cache,
    both inside its own peak-memory scope: a peak is what that setting reached over its own
    prefill (a prefill method, a policy that changes the prompt's attention or compacts the
    prompt's cache) and its decode steps, and settings never inherit each other's peaks or
    caches. Seconds per token time the decode steps alone. The ceiling is the hook's dense
    decode over a prompt of the size the setting reads per step (kept tokens x measured
    density): no sparse decode can beat it.
    """
    options = options or HookOptions(min_length=0)
    device = next(model.parameters()).device
    settings = [setting] if isinstance(setting, Setting) else list(setting)
    for length in lengths:
        prompt = benchmark_input(tokenizer, length, seed).to(device)
        for batch in batches:
            with PeakMemory(device) as own_peak:
                own_cache, first = prefill_cache(model, prompt, batch)
                own_s = decode_steps(model, own_cache, first, steps)
            del own_cache, first
            dense = run_setting(model, DENSE, prompt, batch, steps, options)
            for each in settings:
                yield _record(
                    model, each, prompt, batch, steps, options, own_s, own_peak, dense, ceiling
                )


def _record(
    model, setting, prompt, batch, steps, options, own_s, own_peak, dense, ceiling
) -> dict[str, Any]:
    device = prompt.device
    length = prompt.shape[-1]
    sparse = run_setting(model, setting, prompt, batch, steps, options)
    record = {
        "model": str(model.config._name_or_path),
        "setting": setting.label,
        "length": length,
        "batch": batch,
        "steps": steps,
        "own_sdpa_s_per_token": round(own_s, 5),
        "dense_hook_s_per_token": round(dense["s_per_token"], 5),
        "setting_s_per_token": round(sparse["s_per_token"], 5),
        "hook_vs_sdpa": round(own_s / dense["s_per_token"], 3),
        "speedup_vs_sdpa": round(own_s / sparse["s_per_token"], 3),
        "speedup_vs_dense_hook": round(dense["s_per_token"] / sparse["s_per_token"], 3),
        "decode_density": round(sparse["density"] or 1.0, 4),
        "select_share": round(sparse["select_share"], 4),
        "counters": sparse["counters"],  # the method's own (cache hits, recall ...)
        **_activation_fields(sparse["activation"]),
        "kv_bytes_dense": dense["kv_bytes"],
        "kv_bytes": sparse["kv_bytes"],
        "kv_ratio": round(sparse["kv_bytes"] / max(dense["kv_bytes"], 1), 4),
        "kept_tokens": sparse["kept_tokens"],
        "peak_mb_own_sdpa": _round(own_peak.peak_mb),
        "peak_mb_dense_hook": _round(dense["peak_mb"]),
        "peak_mb_setting": _round(sparse["peak_mb"]),
        "peak_added_mb_dense_hook": _round(dense["peak_added_mb"]),
        "peak_added_mb_setting": _round(sparse["peak_added_mb"]),
        "peak_memory_method": own_peak.method,
        "device": str(device),
    }
    if ceiling:
        read = max(1, round(sparse["kept_tokens"] * (sparse["density"] or 1.0)))
        top = run_setting(model, DENSE, prompt[:, -read:], batch, steps, options)
        record.update(
            ceiling_tokens=read,
            ceiling_s_per_token=round(top["s_per_token"], 5),
            ceiling_vs_dense_hook=round(dense["s_per_token"] / top["s_per_token"], 3),
            ceiling_vs_sdpa=round(own_s / top["s_per_token"], 3),
        )
    return record


def _activation_fields(summary: dict[str, Any] | None) -> dict[str, Any]:
    """An activation method's measured sparsity and weight bytes read per step (none without)."""
    if summary is None:
        return {}
    return {
        "activation_sparsity": summary["sparsity"],  # channels skipped, union over the batch
        "activation_row_sparsity": summary["row_sparsity"],
        "activation_by_projection": summary["by_projection"],
        "weight_bytes_per_step": summary["weight_bytes_per_step"],
        "weight_bytes_dense": summary["weight_bytes_dense"],
        "weight_read_ratio": summary["weight_read_ratio"],
    }


def mean_held(layer) -> int:
    """Tokens a cache layer holds per (row, KV head), on average (what a decode step reads)."""
    held = getattr(layer, "held_tokens", None)
    if held is None:
        return layer.get_seq_length()
    count = held()
    return count if isinstance(count, int) else round(float(count.float().mean()))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)

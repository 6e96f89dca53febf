"""Decode seconds per token of settings (activation sparsity, decode selection, eviction and their
combinations) against the hook's dense decode, with the steps of every setting interleaved
(dense, A, B, dense, A, B, ...), so a machine shared with other work slows every setting alike;
each ratio is the median of per-round ratios. Beside each: the bytes a step reads (weights +
KV) against dense's, i.e. the byte-count ceiling of its speedup.

Each setting runs on its own copy of the model inside its own ``sparse_attention`` block (open
together). A batch of ``--batch`` rows holds different prompts (the fidelity text, seeds 0 ..
B-1), so an activation method reads the union of channels that different rows keep
(``--same-rows`` repeats one prompt instead, the upper bound). Settings whose prompt runs as
dense's (no prefill method, no eviction policy) start from a copy of dense's prefilled cache;
the others prefill the batch themselves.

    OMP_NUM_THREADS=2 python benchmarks/activation_interleaved.py --length 8k --steps 32 \\
        --setting 'activation=cats[sparsity=0.4]' \\
        --setting 'decode=quest[budget=1024];activation=teal[sparsity=0.5]'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time

import torch
from transformers import DynamicCache

import sparseattn
from sparseattn.activation.stats import model_weight_bytes
from sparseattn.bench.decode import mean_held
from sparseattn.bench.prefill import benchmark_input
from sparseattn.cli.args import parse_lengths
from sparseattn.compat import cache_kwargs
from sparseattn.setting import Setting


def kv_bytes_read(model, cache, batch: int, density: float) -> float:
    """KV bytes one decode step reads: the tokens each layer holds per (row, KV head), times
    the keys' and values' bytes per token, times the measured decode density."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    held = sum(mean_held(layer) for layer in cache.layers)
    return held * per_token * batch * density


def prefill(model, prompts: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompts, **cache_kwargs(model, cache), logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", default="4k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--same-rows", action="store_true", help="one prompt repeated over the batch")
    p.add_argument("--steps", type=int, default=32, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--setting", action="append", required=True)
    p.add_argument("--out", help="JSON lines file")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    base, tok = sparseattn.load_model(args.model)
    settings = [Setting()] + [Setting.parse(text) for text in args.setting]
    length = parse_lengths(args.length)[0]
    seeds = [0] * args.batch if args.same_rows else list(range(args.batch))
    prompts = torch.cat([benchmark_input(tok, length, seed) for seed in seeds])
    weights = model_weight_bytes(base)
    models = [base] + [copy.deepcopy(base) for _ in settings[1:]]  # before any hook is in
    with contextlib.ExitStack() as stack:
        runs = []
        for setting, model in zip(settings, models):
            options = {"min_length": 0, **setting.hook_kwargs()}
            stats = stack.enter_context(sparseattn.sparse_attention(model, **options))
            reuse = runs and setting.prefill.name == "dense" and setting.evict is None
            if reuse:
                cache, token = copy.deepcopy(runs[0]["prefilled"])
            else:
                start = time.perf_counter()
                cache, token = prefill(model, prompts)
                print(f"{setting.label}: prefill {time.perf_counter() - start:.1f} s", flush=True)
            run = {"model": model, "cache": cache, "token": token, "stats": stats, "t": []}
            if not runs:
                run["prefilled"] = copy.deepcopy((cache, token))
            runs.append(run)
        runs[0].pop("prefilled")
        for _ in range(2 + args.steps):
            for run in runs:
                model = run["model"]
                start = time.perf_counter()
                logits = model(input_ids=run["token"], **cache_kwargs(model, run["cache"])).logits
                run["token"] = logits[:, -1:].argmax(-1)
                run["t"].append(time.perf_counter() - start)
        dense_t = runs[0]["t"][2:]
        dense_kv = kv_bytes_read(base, runs[0]["cache"], args.batch, 1.0)
        for setting, run in zip(settings, runs):
            times = run["t"][2:]
            ratios = [d / s for d, s in zip(dense_t, times)]
            act = run["stats"].activation
            summary = act.summary() if act is not None else {}
            density = run["stats"].density("decode") or 1.0
            kv = kv_bytes_read(base, run["cache"], args.batch, density)
            read = summary.get("weight_bytes_per_step") or weights
            record = {
                "model": args.model,
                "setting": setting.label,
                "length": length,
                "batch": args.batch,
                "rows": "same prompt" if args.same_rows else "different prompts",
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "s_per_token": round(statistics.median(times), 5),
                "speedup_vs_dense_hook": round(statistics.median(ratios), 3),
                "speedup_iqr": [
                    round(q, 3) for q in statistics.quantiles(ratios, n=4)[::2]
                ],  # 25th, 75th percentile of the per-round ratios
                "decode_density": round(density, 4),
                "activation_sparsity": summary.get("sparsity"),
                "activation_row_sparsity": summary.get("row_sparsity"),
                "activation_by_projection": summary.get("by_projection"),
                "weight_bytes_per_step": round(read),
                "weight_read_ratio": round(read / weights, 4),
                "kv_bytes_read_per_step": round(kv),
                "kv_read_ratio": round(kv / dense_kv, 4),
                "bytes_per_step": round(read + kv),
                "byte_ceiling_vs_dense": round((weights + dense_kv) / (read + kv), 3),
                "loadavg_1min_after": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

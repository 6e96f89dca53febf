"""Decode seconds per token of activation sparsity settings against the hook's dense decode,
with the steps of every setting interleaved (dense, A, B, dense, A, B, ...), so a machine shared
with other work slows every setting alike; each ratio is the median of per-round ratios.

Each setting runs on its own copy of the model inside its own ``sparse_attention`` block (open
together), from its own prefill of the same prompt (dense prefill, repeated over the batch).

    OMP_NUM_THREADS=1 python benchmarks/activation_interleaved.py --length 4k --steps 32 \
        --setting 'activation=cats[sparsity=0.4]' --setting 'activation=teal[sparsity=0.5]'
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch
from transformers import DynamicCache

import sparseattn
from sparseattn.bench.prefill import benchmark_input
from sparseattn.cli.args import parse_lengths
from sparseattn.compat import cache_kwargs
from sparseattn.setting import Setting


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", default="4k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="timed rounds (after 2 warm-up rounds)")
    p.add_argument("--setting", action="append", required=True)
    p.add_argument("--out", help="JSON lines file")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    base, tok = sparseattn.load_model(args.model)
    settings = [Setting()] + [Setting.parse(text) for text in args.setting]
    prompt = benchmark_input(tok, parse_lengths(args.length)[0], 0)
    models = [base] + [copy.deepcopy(base) for _ in settings[1:]]  # before any hook is in
    with contextlib.ExitStack() as stack:
        runs = []
        for setting, model in zip(settings, models):
            options = {"min_length": 0, **setting.hook_kwargs()}
            stats = stack.enter_context(sparseattn.sparse_attention(model, **options))
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt, **cache_kwargs(model, cache), logits_to_keep=1)
            if args.batch > 1:
                cache.batch_repeat_interleave(args.batch)
            token = out.logits[:, -1:].argmax(-1).expand(args.batch, 1).contiguous()
            runs.append({"model": model, "cache": cache, "token": token, "stats": stats, "t": []})
        for _ in range(2 + args.steps):
            for run in runs:
                model = run["model"]
                start = time.perf_counter()
                logits = model(input_ids=run["token"], **cache_kwargs(model, run["cache"])).logits
                run["token"] = logits[:, -1:].argmax(-1)
                run["t"].append(time.perf_counter() - start)
        dense_t = runs[0]["t"][2:]
        for setting, run in zip(settings, runs):
            times = run["t"][2:]
            ratios = [d / s for d, s in zip(dense_t, times)]
            act = run["stats"].activation
            summary = act.summary() if act is not None else {}
            record = {
                "model": args.model,
                "setting": setting.label,
                "length": prompt.shape[-1],
                "batch": args.batch,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "s_per_token": round(statistics.median(times), 5),
                "speedup_vs_dense_hook": round(statistics.median(ratios), 3),
                "speedup_iqr": [
                    round(q, 3) for q in statistics.quantiles(ratios, n=4)[::2]
                ],  # 25th, 75th percentile of the per-round ratios
                "decode_density": run["stats"].density("decode"),
                "activation_sparsity": summary.get("sparsity"),
                "weight_bytes_per_step": summary.get("weight_bytes_per_step"),
                "weight_read_ratio": summary.get("weight_read_ratio"),
            }
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

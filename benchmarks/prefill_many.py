"""End-to-end prefill of several settings against the hook's dense path, in one process.

``sparseattn bench prefill`` measures one setting with three dense passes beside it; comparing
eight methods at 8K that way costs 32 forwards. This script runs the hook's dense prefill
first and last (drift shows as their difference) and each setting once in between, every pass
with the per-layer timers on (free on the CPU), and writes one JSONL record per setting:
seconds, speedup over the mean of the two dense passes, measured density, estimation seconds
(``select_s``) and its share of the setting's prefill and of the dense pass's attention.

    python benchmarks/prefill_many.py --model smollm2-135m --length 8k \\
        --setting "prefill=pbs[threshold=0.8]" --setting "prefill=hip[budget=1024]" \\
        --out docs/results/prefill_second_wave_smollm2_8k.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", default="8k")
    parser.add_argument("--setting", action="append", required=True, help="repeatable")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--out", default=None, help="JSONL file to append records to")
    args = parser.parse_args(argv)

    import torch

    from sparseattn import load_model, sparse_attention
    from sparseattn.bench.prefill import benchmark_input
    from sparseattn.cli.args import parse_lengths
    from sparseattn.setting import Setting

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [Setting.parse(text) for text in args.setting]  # a bad spec fails before compute
    (length,) = parse_lengths(args.length)
    model, tokenizer = load_model(args.model)
    model.eval()
    ids = benchmark_input(tokenizer, length, 0)

    def run(kwargs: dict) -> tuple[float, dict]:
        with torch.inference_mode(), sparse_attention(model, **kwargs, timing=True) as stats:
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            seconds = time.perf_counter() - start
            return seconds, {
                "density": stats.density("prefill"),
                **stats.seconds("prefill"),
            }

    with torch.inference_mode(), sparse_attention(model, min_length=0):  # kernels built, warm
        model(input_ids=ids[:, :1024], use_cache=False, logits_to_keep=1)
    dense_first, dense_stats = run({"min_length": 0})
    measured = []
    for setting in settings:
        measured.append((setting, *run({**setting.hook_kwargs(), "min_length": 0})))
    dense_last, _ = run({"min_length": 0})
    dense = (dense_first + dense_last) / 2
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed below)
    for setting, seconds, stats in measured:
        record = {
            "model": args.model,
            "length": length,
            "setting": setting.label,
            "sparse_s": round(seconds, 3),
            "hook_dense_s": round(dense, 3),
            "hook_dense_first_s": round(dense_first, 3),
            "hook_dense_last_s": round(dense_last, 3),
            "speedup_vs_hook_dense": round(dense / seconds, 3),
            "density": round(stats["density"], 4),
            "select_s": round(stats["select_s"], 3),
            "attend_s": round(stats["attend_s"], 3),
            "select_share_of_prefill": round(stats["select_s"] / seconds, 4),
            "select_share_of_dense_attention": round(
                stats["select_s"] / max(dense_stats["attend_s"], 1e-9), 4
            ),
            "dense_attention_s": round(dense_stats["attend_s"], 3),
        }
        print(json.dumps(record), flush=True)
        if out is not None:
            out.write(json.dumps(record) + "\n")
    if out is not None:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

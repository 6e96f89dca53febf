"""Scores through vLLM (benchmarks/vllm_bench.py records with per-request ``scores``) against the
Hugging Face frontier's on the same samples (seed 0, sample i = request i): per task and
setting, the paired difference vLLM - HF with its 95% bootstrap interval (the frontier's
statistics), and each path's own difference from its dense.

    python benchmarks/vllm_vs_hf.py docs/results/vllm_cpu_smollm2_accuracy_4k.jsonl \\
        docs/results/frontier_4k_20/results.jsonl
"""

from __future__ import annotations

import argparse
import json

from sparseattn.bench.stats import bootstrap_interval

# vllm_bench.py's setting names -> the frontier's setting labels
LABELS = {
    "dense": "dense",
    "xattention": "xattention[threshold=0.9]",
    "tri_shape": "tri_shape[window=1024]",
    "quest": "prefill=dense;decode=quest[budget=1024]",
}


def fmt(interval) -> str:
    return f"{interval.mean:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}] {interval.verdict}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vllm", help="vllm_bench.py JSONL with per-request scores")
    p.add_argument("frontier", help="the frontier's results.jsonl (same length, seed 0)")
    p.add_argument("--out", help="append one JSON record per (task, setting)")
    args = p.parse_args()
    with open(args.vllm) as f:
        vllm = [json.loads(line) for line in f if line.strip()]
    hf: dict[tuple[str, str], dict[int, float]] = {}
    with open(args.frontier) as f:
        for r in (json.loads(line) for line in f if line.strip()):
            hf.setdefault((r["task"], r["setting"]), {})[r["sample"]] = float(r["score"])
    dense_v = {r["task"]: r["scores"] for r in vllm if r["setting"] == "dense"}
    for r in vllm:
        task, label = r["task"], LABELS[r["setting"]]
        ours = hf.get((task, label), {})
        pairs = [(v, ours[i]) for i, v in enumerate(r["scores"]) if i in ours]
        same = bootstrap_interval([v - h for v, h in pairs])
        record = {
            "task": task,
            "setting": r["setting"],
            "requests": len(pairs),
            "vllm_score": round(sum(v for v, _ in pairs) / len(pairs), 3),
            "hf_score": round(sum(h for _, h in pairs) / len(pairs), 3),
            "vllm_minus_hf": [round(same.mean, 3), round(same.low, 3), round(same.high, 3)],
            "verdict": same.verdict,
        }
        if r["setting"] != "dense" and task in dense_v:
            vd = bootstrap_interval([a - b for a, b in zip(r["scores"], dense_v[task])])
            hd_dense = hf.get((task, "dense"), {})
            hd = bootstrap_interval(
                [
                    ours[i] - hd_dense[i]
                    for i in range(len(r["scores"]))
                    if i in ours and i in hd_dense
                ]
            )
            record["vllm_vs_its_dense"] = [round(vd.mean, 3), round(vd.low, 3), round(vd.high, 3)]
            record["hf_vs_its_dense"] = [round(hd.mean, 3), round(hd.low, 3), round(hd.high, 3)]
        print(
            f"{task:18} {r['setting']:11} vLLM {record['vllm_score']:.2f}  HF {record['hf_score']:.2f}"
            f"  vLLM-HF {fmt(same)}  (n={len(pairs)})"
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

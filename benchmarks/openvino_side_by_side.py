"""Dense decode side by side with OpenVINO GenAI on the CPU: TTFT and TPOT, same prompt, same
threads, one run.

Set up (a virtual environment of its own; OpenVINO is neither a dependency nor part of the
tests), then export SmolLM2 as an fp32 OpenVINO IR from the model directory the vLLM docs write
(``docs/vllm.md``: the GGUF saved with ``save_pretrained``):

    python -m venv /work/venv-ov
    /work/venv-ov/bin/pip install torch==2.13.0
    /work/venv-ov/bin/pip install "optimum-intel[openvino]" openvino-genai openvino-tokenizers
    /work/venv-ov/bin/optimum-cli export openvino --model /work/models/smollm2-135m \\
        --task text-generation-with-past --weight-format fp32 /work/models/smollm2-ov-fp32

Run (alone on the machine):

    python benchmarks/openvino_side_by_side.py --ov-python /work/venv-ov/bin/python \\
        --ov-model /work/models/smollm2-ov-fp32 --lengths 4k,8k \\
        --out docs/results/decode_openvino_side_by_side.jsonl

Sides, each from its own prefill of the same token ids (``bench.prefill.benchmark_input``),
greedy, ``--tokens`` generated tokens, ``--threads`` threads:

- ``openvino``: OpenVINO GenAI's ``LLMPipeline`` on the fp32 IR, its default CPU settings (the
  KV cache stored as u8 with per-group scales: a quarter of the KV bytes of fp32);
- ``openvino_f32_kv``: the same with ``KV_CACHE_PRECISION=f32`` (the same bytes as ours);
- ``hook_lean``: ``sparse_attention(model)`` dense, lean decode step (the default);
- ``hook_modules``: the same with ``lean_decode=False`` (the decoder layers' own modules);
- ``transformers_sdpa``: transformers' own SDPA path, no hook.

Every OpenVINO measurement is a fresh process and pipeline (its prefix cache would otherwise
serve the second prompt). Rounds rotate the order of the sides so drift spreads over all of
them. TTFT is the prompt's forward (first token included); TPOT the mean seconds per token
after the first (OpenVINO's ``get_tpot``, our same definition); ``tpot_median_s`` is ours only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("openvino", "openvino_f32_kv", "hook_lean", "hook_modules", "transformers_sdpa")


def openvino_worker(args: argparse.Namespace) -> int:
    """Inside the OpenVINO venv: one pipeline, one generation, one JSON line."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    ids = np.load(args.ids)
    config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"}
    if args.kv_precision:
        config["KV_CACHE_PRECISION"] = args.kv_precision
    pipe = og.LLMPipeline(args.ov_model, "CPU", **config)
    generation = og.GenerationConfig()
    generation.max_new_tokens = generation.min_new_tokens = args.tokens
    generation.ignore_eos = True
    inputs = og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    metrics = pipe.generate(inputs, generation).perf_metrics
    print(
        json.dumps(
            {
                "ttft_s": metrics.get_ttft().mean / 1e3,
                "tpot_s": metrics.get_tpot().mean / 1e3,
                "tokens": metrics.get_num_generated_tokens(),
            }
        )
    )
    return 0


def run_openvino(args: argparse.Namespace, ids_path: str, kv_precision: str | None) -> dict:
    command = [
        args.ov_python,
        __file__,
        "--worker",
        "--ids",
        ids_path,
        "--ov-model",
        args.ov_model,
        "--tokens",
        str(args.tokens),
        "--threads",
        str(args.threads),
    ]
    if kv_precision:
        command += ["--kv-precision", kv_precision]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"OpenVINO worker failed: {run.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def run_ours(model, ids, tokens: int, side: str) -> dict:
    import torch

    from sparseattn import sparse_attention

    def generate() -> tuple[float, list[float]]:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - start
        cache, steps = out.past_key_values, []
        for _ in range(tokens - 1):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
        return ttft, steps

    with torch.inference_mode():
        if side == "transformers_sdpa":
            ttft, steps = generate()
        else:
            with sparse_attention(model, min_length=0, lean_decode=side == "hook_lean"):
                ttft, steps = generate()
    return {
        "ttft_s": ttft,
        "tpot_s": statistics.fmean(steps),
        "tpot_median_s": statistics.median(steps),
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--kv-precision", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help="our side's model")
    parser.add_argument("--ov-model", required=True, help="the exported OpenVINO IR directory")
    parser.add_argument("--ov-python", default=None, help="python of the OpenVINO venv")
    parser.add_argument("--lengths", default="4k,8k")
    parser.add_argument("--tokens", type=int, default=24, help="generated tokens per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--out", default=None, help="JSONL file to append records to")
    args = parser.parse_args(argv)
    if args.worker:
        return openvino_worker(args)
    if not args.ov_python:
        parser.error("--ov-python (the OpenVINO venv's python) is required")
    sides = args.sides.split(",")
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"--sides {unknown}: allowed {list(SIDES)}")

    import numpy as np
    import torch

    from sparseattn import load_model
    from sparseattn.bench.prefill import benchmark_input
    from sparseattn.cli.args import parse_lengths

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 (closed below)
    with tempfile.TemporaryDirectory() as tmp:
        for length in parse_lengths(args.lengths):
            ids = benchmark_input(tokenizer, length, 0)
            ids_path = str(Path(tmp) / f"ids_{length}.npy")
            np.save(ids_path, ids.numpy())
            for turn in range(args.rounds):
                order = sides[turn % len(sides) :] + sides[: turn % len(sides)]
                for side in order:
                    if side.startswith("openvino"):
                        kv = "f32" if side == "openvino_f32_kv" else None
                        result = run_openvino(args, ids_path, kv)
                    else:
                        result = run_ours(model, ids, args.tokens, side)
                    record = {
                        "side": side,
                        "length": length,
                        "round": turn,
                        "threads": args.threads,
                        **{
                            k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()
                        },
                    }
                    print(json.dumps(record), flush=True)
                    if out is not None:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
    if out is not None:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

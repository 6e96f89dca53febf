"""vLLM on CPU with sparseattn's plugin: throughput, TTFT and TPOT per setting, one JSONL record
each (docs/vllm.md). Run it in the vLLM environment (.ci/vllm builds one):

    python benchmarks/vllm_bench.py --model /work/models/smollm2-135m \
        --out docs/results/vllm_cpu_smollm2.jsonl

Every setting runs in a fresh process (vLLM's own backend for ``dense``: the plugin is not
loaded) on the same requests: ``--requests`` samples of ``--task`` (default niah_single; e.g.
variable_tracking) at ``--prompt-tokens`` tokens (samples (seed 0, index i), the same the
frontier draws; the answers are scored), greedy,
``--output-tokens`` each, ``ignore_eos`` so every request generates the same count
(``--stop-at-eos`` for accuracy runs: stop as the HF frontier does); prefix
caching off (every prompt token is computed). All requests arrive at once and the engine is
stepped here: ``ttft_s`` is the mean over requests of (first token - arrival), queueing behind
other prefills included; ``tpot_s`` the mean of (last token - first token) / (tokens - 1);
``wall_s`` the whole run; ``output_tok_s`` = generated tokens / wall_s, ``total_tok_s`` counts
prompt tokens too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = {
    "dense": None,
    "xattention": "prefill=xattention[threshold=0.9]",
    "tri_shape": "prefill=tri_shape",
    "quest": "decode=quest[budget=1024]",
    "xattention+quest": "prefill=xattention[threshold=0.9];decode=quest[budget=1024]",
    "tri_shape+quest": "prefill=tri_shape;decode=quest[budget=1024]",
}


def run_one(args: argparse.Namespace) -> dict:
    """One setting in this process: start the engine, generate, time, score."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sparseattn.bench.tasks import build_task

    tok = AutoTokenizer.from_pretrained(args.model)
    task = build_task(args.task)
    samples = [task.generate(tok, args.prompt_tokens, 0, i) for i in range(args.requests)]
    extra = {}
    if args.setting_spec:
        config = {"setting": args.setting_spec, "min_length": args.min_length}
        extra["additional_config"] = {"sparseattn": config}
    start = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=args.prompt_tokens + args.output_tokens + 16,
        max_num_batched_tokens=args.batched_tokens,
        kv_cache_memory_bytes=3 << 30,  # the CPU backend otherwise reserves most of RAM
        enable_prefix_caching=False,  # the niah prompts share text: every token is computed
        seed=0,
        **extra,
    )
    startup = time.perf_counter() - start
    params = SamplingParams(
        temperature=0.0, max_tokens=args.output_tokens, ignore_eos=not args.stop_at_eos
    )
    engine = llm.llm_engine
    start = time.perf_counter()
    for i, sample in enumerate(samples):  # every request arrives at start
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=sample.input_ids), params)
    first, last, final = {}, {}, {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                last[out.request_id], final[out.request_id] = now, out
    wall = time.perf_counter() - start
    outputs = [final[str(i)] for i in range(len(samples))]
    ttft = [first[str(i)] - start for i in range(len(samples))]
    tpot = [
        (last[str(i)] - first[str(i)]) / (len(o.outputs[0].token_ids) - 1)
        for i, o in enumerate(outputs)
        if len(o.outputs[0].token_ids) > 1
    ]
    scores = [task.score(o.outputs[0].text, s.references) for o, s in zip(outputs, samples)]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    record = {
        "bench": "vllm_cpu",
        "model": os.path.basename(args.model.rstrip("/")),
        "setting": args.setting,
        "spec": args.setting_spec or "vLLM's own CPU_ATTN (plugin not loaded)",
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "stop_at_eos": args.stop_at_eos,
        "max_num_batched_tokens": args.batched_tokens,
        "min_length": args.min_length,
        "startup_s": round(startup, 2),
        "wall_s": round(wall, 3),
        "output_tok_s": round(generated / wall, 3),
        "total_tok_s": round((generated + args.requests * args.prompt_tokens) / wall, 2),
        "ttft_s": round(sum(ttft) / len(ttft), 3) if ttft else None,
        "tpot_s": round(sum(tpot) / len(tpot), 4) if tpot else None,
        "task": args.task,
        "score": sum(scores) / len(scores),
        "scores": scores,  # per request: pairs with the HF frontier's samples (seed 0, index i)
        **({"niah_single_score": sum(scores) / len(scores)} if args.task == "niah_single" else {}),
        "threads": __import__("torch").get_num_threads(),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),  # other work on the machine
    }
    if args.setting_spec:
        from sparseattn.vllm.backend import run_summary

        record["measured_density"] = run_summary()
    import vllm

    record["vllm"] = vllm.__version__
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model directory")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop a request at its end-of-sequence token, as the HF frontier does (accuracy "
        "runs: pass the task's answer length as --output-tokens); default: ignore_eos",
    )
    parser.add_argument("--batched-tokens", type=int, default=8192)
    parser.add_argument("--min-length", type=int, default=1024)
    parser.add_argument(
        "--task",
        default="niah_single",
        help="a registered task name, e.g. variable_tracking (scored)",
    )
    parser.add_argument("--out", help="append the records to this JSONL file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting here
    args = parser.parse_args()
    if args.one:
        args.setting, args.setting_spec = args.one, SETTINGS[args.one]
        print("RECORD " + json.dumps(run_one(args)), flush=True)
        return
    for name in args.settings:
        env = dict(os.environ)
        if SETTINGS[name] is None:
            env["VLLM_PLUGINS"] = "none"  # load no general plugin: vLLM's own backend
        env.pop("SPARSEATTN_SETTING", None)
        command = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RECORD ")]
        if done.returncode or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"setting {name} failed (exit {done.returncode})")
        record = json.loads(lines[-1][len("RECORD ") :])
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

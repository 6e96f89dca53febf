"""Greedy generation through vLLM's ``LLM`` for tests/vllm_plugin: one process, one engine per
setting in turn (the engine runs in this process), one ``RESULT {json}`` line per engine.

    python tests/vllm_plugin/run_llm.py --model DIR --prompts prompts.json \
        --settings '[null, "prefill=xattention[threshold=1.0]"]' --max-tokens 8

A setting of null passes no additional config (vLLM's own backend runs every call, plugin
loaded or not). Needs the ``if __name__ == "__main__"`` guard: vLLM may start processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token id lists")
    parser.add_argument("--settings", required=True, help="JSON list of setting strings / null")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--batched-tokens", type=int, default=512)
    parser.add_argument("--min-length", type=int, default=0)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(f)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for setting in json.loads(args.settings):
        extra = {}
        if setting is not None:
            config = {"setting": setting, "min_length": args.min_length}
            extra["additional_config"] = {"sparseattn": config}
        start = time.perf_counter()
        llm = LLM(
            model=args.model,
            dtype="float32",
            enforce_eager=True,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.batched_tokens,
            max_num_seqs=8,
            kv_cache_memory_bytes=1 << 30,  # the CPU backend otherwise reserves most of RAM
            seed=0,
            **extra,
        )
        started = time.perf_counter() - start
        outputs = llm.generate(prompts, params, use_tqdm=False)
        summary = None
        if setting is not None:
            from sparseattn.vllm.backend import run_summary

            summary = run_summary()
        result = {
            "setting": setting,
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "density": summary,
            "startup_s": round(started, 1),
            "total_s": round(time.perf_counter() - start, 1),
        }
        print("RESULT " + json.dumps(result), flush=True)
        del llm
        gc.collect()


if __name__ == "__main__":
    main()

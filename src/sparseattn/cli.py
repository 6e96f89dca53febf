"""sparseattn: make a Hugging Face causal LM attend sparsely, and measure what it costs and buys."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError
from .models import DEFAULT_MODEL, builtin_models
from .parsing import parse_value


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    knobs = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--knob expects name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        knobs[name.strip()] = parse_value(value.strip())
    return knobs


def parse_lengths(text: str) -> list[int]:
    """'4k,8k,1000' -> [4096, 8192, 1000]."""
    lengths = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            lengths.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise UsageError(f"bad length {part!r}; use integers or NNk, e.g. 4k,8k") from None
    return lengths


def cmd_methods(args) -> int:
    from .registry import list_methods, method_info

    infos = [method_info(name) for name in list_methods()]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for info in infos:
        flag = "" if info["speedup"] else "  [analysis only, not a speedup]"
        print(f"{info['name']:<16} phases: {', '.join(info['phases'])}{flag}")
        print(f"    {info['summary']}")
        print(f"    paper: {info['paper']}")
        for knob in info["knobs"]:
            if knob.get("choices"):
                allowed = knob["choices"]
            elif knob.get("min") is not None or knob.get("max") is not None:
                allowed = [knob.get("min"), knob.get("max")]
            else:
                allowed = "text"
            print(
                f"    --knob {knob['name']}={knob['default']}  allowed {allowed}  {knob.get('help', '')}"
            )
    return 0


def cmd_generate(args) -> int:
    import torch

    from . import load_model, sparse_attention

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if prompt is None:
        raise UsageError("give --prompt-file FILE or --prompt TEXT")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if tok.chat_template and not args.no_chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    ids = ids.to(args.device)
    knobs = parse_knobs(args.knob)
    with (
        torch.inference_mode(),
        sparse_attention(model, args.method, min_length=args.min_length, **knobs) as stats,
    ):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    summary = {
        "prompt_tokens": ids.shape[1],
        **{
            p: {k: v for k, v in s.items() if k != "layer_density"}
            for p, s in stats.summary().items()
        },
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    records = []
    if args.plot and args.kind != "recall":
        raise UsageError(f"--plot draws recall curves; it does not apply to bench {args.kind}")
    if args.plot and not args.plot.endswith(".png"):
        raise UsageError(f"--plot {args.plot!r} must name a .png file")
    if args.kind == "kernel":
        from .bench.kernel import KernelShape, compile_report, run_kernel_bench

        shape = KernelShape(block_size=args.block_size, device=args.device)
        lengths = parse_lengths(args.lengths or "4k,8k,16k,32k")
        try:
            densities = [float(x) for x in (args.densities or "0.05,0.1,0.25,0.5").split(",")]
        except ValueError:
            raise UsageError(
                f"--densities {args.densities!r}: give numbers, e.g. 0.1,0.25"
            ) from None
        records.append(compile_report(parse_lengths(args.compile_lengths), shape))
        _emit(records[-1], args.json)
        for record in run_kernel_bench(lengths, densities, shape, repeats=args.repeats):
            records.append(record)
            _emit(record, args.json)
    else:
        from . import load_model
        from .bench.decode import run_decode_bench
        from .bench.prefill import run_prefill_bench

        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        torch.set_grad_enabled(False)
        knobs = parse_knobs(args.knob)
        hook = {"dense_layers": args.dense_layers}
        lengths = parse_lengths(args.lengths or "8k")
        if args.kind == "prefill":
            runs = run_prefill_bench(
                model, tok, args.method, knobs, lengths, repeats=args.repeats, hook_options=hook
            )
        elif args.kind == "decode":
            runs = run_decode_bench(
                model, tok, args.method, knobs, lengths, steps=args.steps, hook_options=hook
            )
        else:
            runs = _recall_runs(args, model, tok, lengths)
        for record in runs:
            records.append(record)
            _emit(record, args.json)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.plot:
        from .bench.plots import recall_curves

        recall_curves(records, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _recall_runs(args, model, tok, lengths: list[int]):
    from .bench.recall import run_recall_bench
    from .bench.sweep import expand_settings, parse_grid_args

    methods = args.method.split(",")
    settings = expand_settings(methods, parse_grid_args(args.grid))
    if "dense" not in methods:
        settings = [s for s in settings if s.method != "dense"]
    n = model.config.num_hidden_layers
    layers = tuple(args.layers) if args.layers else tuple(sorted({0, n // 3, 2 * n // 3, n - 1}))
    return run_recall_bench(model, tok, settings, lengths, layers)


QUICK = {
    "methods": ["dense", "streaming", "tri_shape", "strided"],
    "tasks": ["niah_single:haystack=noise", "niah_multivalue", "variable_tracking", "fidelity"],
    "lengths": "1k,2k",
    "samples": 2,
    "grid": [
        "streaming.window=256",
        "tri_shape.window=256",
        "strided.stride=4",
        "strided.window=256",
    ],
}


def cmd_frontier(args) -> int:
    import torch

    from . import load_model
    from .bench.frontier import FrontierConfig, prepare_out_dir, run_frontier
    from .bench.report import write_report
    from .bench.sweep import (
        default_task_specs,
        expand_settings,
        load_grid_file,
        parse_grid_args,
        parse_task_list,
    )
    from .registry import list_methods

    if args.quick:
        args.methods = args.methods or ",".join(QUICK["methods"])
        args.tasks = args.tasks or ",".join(QUICK["tasks"])
        args.lengths = args.lengths or QUICK["lengths"]
        args.samples = args.samples or QUICK["samples"]
        args.grid = args.grid or QUICK["grid"]
    methods = args.methods.split(",") if args.methods else list_methods()
    grids = load_grid_file(args.grid_file) if args.grid_file else {}
    for method, knobs in parse_grid_args(args.grid).items():
        grids.setdefault(method, {}).update(knobs)
    settings = expand_settings(methods, grids)
    tasks = parse_task_list(args.tasks) if args.tasks else default_task_specs()
    config = FrontierConfig(
        model=args.model,
        settings=settings,
        tasks=tasks,
        lengths=parse_lengths(args.lengths or "4k,8k"),
        samples=args.samples or 20,
        seed=args.seed,
        hook_options={"min_length": args.min_length, "dense_layers": args.dense_layers},
        dtype=args.dtype,
    )
    prepare_out_dir(Path(args.out), config, args.resume_anyway)  # before loading anything
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    torch.set_grad_enabled(False)
    print(
        f"frontier: {len(settings)} settings x {len(tasks)} tasks x {len(config.lengths)} lengths x "
        f"{config.samples} samples = {config.total()} records -> {args.out}",
        file=sys.stderr,
    )
    try:
        run_frontier(
            config,
            args.out,
            model,
            tok,
            resume_anyway=args.resume_anyway,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: every finished record is in {args.out}/results.jsonl; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    write_report(args.out)
    print(
        f"report: {args.out}/report.md, {args.out}/report.html, {args.out}/summary.csv",
        file=sys.stderr,
    )
    return 0


def cmd_report(args) -> int:
    from .bench.report import write_report

    if not (Path(args.dir) / "results.jsonl").exists():
        raise UsageError(
            f"{args.dir}/results.jsonl not found; run `sparseattn frontier --out {args.dir}` first"
        )
    write_report(args.dir)
    print(
        f"report: {args.dir}/report.md, {args.dir}/report.html, {args.dir}/summary.csv",
        file=sys.stderr,
    )
    return 0


def cmd_profile(args) -> int:
    import time

    from . import load_model
    from .bench.calibrate import calibrate, write_profile

    lengths = parse_lengths(args.lengths)
    if not lengths or min(lengths) < 256:
        raise UsageError(f"--lengths {args.lengths!r}: give lengths of at least 256 tokens")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be >= 1")
    out = Path(args.out)
    if out.suffix != ".json":
        raise UsageError(f"--out {args.out!r} must name a .json file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    start = time.perf_counter()
    n_inputs = len(lengths) * 3 * args.samples
    seen = []

    def progress(label: str) -> None:
        seen.append(label)
        print(f"[{len(seen)}/{n_inputs}] {label}", file=sys.stderr, flush=True)

    profile = calibrate(
        model,
        tok,
        kind=args.kind,
        model_id=args.model,
        lengths=lengths,
        seed=args.seed,
        samples=args.samples,
        block_size=args.block_size,
        stride=args.stride,
        progress=progress,
    )
    write_profile(str(out), profile)
    skip = set(profile["calibration"]["sliding_layers"]) if args.kind == "minference" else set()
    for level, row in sorted(profile["summary"].items()):
        used = [i for i in range(len(row["recall"])) if i not in skip]
        recall = sum(row["recall"][i] for i in used) / len(used)
        density = sum(row["density"][i] for i in used) / len(used)
        name = "budget" if args.kind == "minference" else "target recall"
        print(
            f"{name} {level:g}: mean recall {recall:.3f}, mean density {density:.3f}",
            file=sys.stderr,
        )
    print(f"profile: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def _emit(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        print("  ".join(f"{k}={v}" for k, v in record.items()), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseattn", description=__doc__ or "sparseattn")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list every method with its knobs, defaults and paper")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    model_help = (
        f"built-in name ({', '.join(builtin_models())}), local folder, .gguf file or cached HF id"
    )
    p = sub.add_parser("generate", help="generate from a prompt with a sparse method")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--method", default="dense", help="registered method (see `sparseattn methods`)")
    p.add_argument("--knob", action="append", metavar="NAME=VALUE", help="method knob, repeatable")
    p.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--prompt", help="prompt text (instead of --prompt-file)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--min-length", type=int, default=1024, help="calls shorter than this stay dense"
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="speed vs dense, measured in the same run")
    p.add_argument(
        "kind",
        choices=["kernel", "prefill", "decode", "recall"],
        help="kernel: attention alone; prefill / decode: the whole model; "
        "recall: share of the true attention mass kept vs measured density",
    )
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument(
        "--lengths", help="comma list, e.g. 4k,8k,16k,32k (kernel default; prefill default 8k)"
    )
    p.add_argument("--densities", help="kernel: target block densities, default 0.05,0.1,0.25,0.5")
    p.add_argument("--block-size", type=int, default=128, help="kernel: tile size")
    p.add_argument(
        "--compile-lengths",
        default="1000,3000,5000,7000",
        help="kernel: varied lengths for the compile count",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--steps", type=int, default=32, help="decode: tokens timed per length")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"prefill/decode: {model_help}")
    p.add_argument(
        "--method",
        default="streaming",
        help="prefill/decode: method to compare with dense; recall: comma list of methods",
    )
    p.add_argument(
        "--knob",
        action="append",
        metavar="NAME=VALUE",
        help="prefill/decode: method knob, repeatable",
    )
    p.add_argument(
        "--dense-layers", type=int, nargs="*", default=[], help="prefill/decode: layers kept dense"
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="METHOD.KNOB=V1,V2",
        help="recall: knob values to sweep (each method's default grid otherwise)",
    )
    p.add_argument("--layers", type=int, nargs="*", help="recall: layers to capture (default: 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the records to this JSONL file")
    p.add_argument("--plot", metavar="FILE.png", help="recall: recall-vs-density curves")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "frontier", help="the sweep: accuracy, measured density and speed of every setting"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--methods", help="comma list of methods (default: every registered method)")
    p.add_argument(
        "--tasks", help="comma list of task specs, e.g. niah_single:haystack=kv,qa (default: all)"
    )
    p.add_argument("--lengths", help="comma list of token lengths, e.g. 4k,8k (default 4k,8k)")
    p.add_argument("--samples", type=int, help="samples per (task, length) (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--grid",
        action="append",
        metavar="METHOD.KNOB=V1,V2",
        help="knob values to sweep, repeatable",
    )
    p.add_argument("--grid-file", help="TOML file: one [method] table with knob = [values]")
    p.add_argument(
        "--quick", action="store_true", help="small set that finishes in minutes on a CPU"
    )
    p.add_argument("--min-length", type=int, default=0, help="calls shorter than this stay dense")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers kept dense")
    p.add_argument(
        "--resume-anyway", action="store_true", help="add to a DIR made with another configuration"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", required=True, help="output directory (results.jsonl, summary.csv, report.*)"
    )
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser(
        "profile",
        help="calibrate per-head patterns (minference) or thresholds (xattention) for a model",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--kind", required=True, choices=["minference", "xattention"])
    p.add_argument("--out", required=True, help="the profile to write, FILE.json")
    p.add_argument("--lengths", default="4k", help="calibration input lengths (default 4k)")
    p.add_argument(
        "--samples", type=int, default=1, help="inputs per (length, calibration task) (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated calibration inputs")
    p.add_argument("--block-size", type=int, default=128, choices=[16, 32, 64, 128, 256])
    p.add_argument("--stride", type=int, default=8, choices=[4, 8, 16], help="xattention stride")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "report", help="rewrite summary.csv, report.md, report.html and plots from DIR"
    )
    p.add_argument("dir", help="a frontier output directory")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

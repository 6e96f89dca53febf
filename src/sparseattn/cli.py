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
from .setting import Setting, Spec


def parse_knobs(pairs: list[str]) -> dict[str, Any]:
    knobs = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--knob expects name=value, got {pair!r}")
        name, value = pair.split("=", 1)
        knobs[name.strip()] = parse_value(value.strip())
    return knobs


def add_setting_args(p: argparse.ArgumentParser, method_default: str, method_help: str) -> None:
    """--method/--knob (one method, or the prefill method with --decode), --decode, --evict,
    or a whole --setting."""
    p.add_argument("--method", default=method_default, help=method_help)
    p.add_argument("--knob", action="append", metavar="NAME=VALUE", help="method knob, repeatable")
    p.add_argument("--decode", help="decode method (then --method is the prefill method)")
    p.add_argument("--decode-knob", action="append", metavar="NAME=VALUE", help="repeatable")
    p.add_argument("--evict", help="eviction policy (see `sparseattn methods`)")
    p.add_argument("--evict-knob", action="append", metavar="NAME=VALUE", help="repeatable")
    p.add_argument(
        "--setting",
        action="append",
        help="a whole setting, e.g. 'prefill=xattention;decode=streaming[window=512];"
        "evict=streaming[window=1024]' (instead of the flags above; bench decode takes it "
        "repeatedly and measures every setting against one dense prefill and reference)",
    )
    p.add_argument("--page-size", type=int, default=16, help="cache page size in tokens")


def settings_from_args(args) -> list[Setting]:
    """Every --setting given (validated), or the one the --method/--decode/--evict flags
    describe."""
    if args.setting:
        settings = [Setting.parse(text) for text in args.setting]
        for setting in settings:
            _ = setting.parts  # builds every method and policy: bad names and knobs fail here
        return settings
    return [setting_from_args(args)]


def setting_from_args(args) -> Setting:
    """The Setting the --method/--decode/--evict/--setting flags describe (validated)."""
    if args.setting and len(args.setting) > 1:
        raise UsageError(
            f"--setting given {len(args.setting)} times; only bench decode measures several "
            "settings in one run"
        )
    if args.setting:
        setting = Setting.parse(args.setting[0])
    else:
        method = Spec(args.method, parse_knobs(args.knob))
        evict = Spec(args.evict, parse_knobs(args.evict_knob)) if args.evict else None
        if args.decode:
            decode = Spec(args.decode, parse_knobs(args.decode_knob))
            setting = Setting(prefill=method, decode=decode, evict=evict)
        else:
            setting = Setting(prefill=method, decode=method, evict=evict)
    _ = setting.parts  # builds every method and policy: bad names and knobs fail here
    return setting


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
    from .registry import list_methods, list_policies, method_info, policy_info

    infos = [method_info(name) for name in list_methods()]
    infos += [policy_info(name) for name in list_policies()]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 0
    for info in infos:
        if info.get("kind") == "eviction":
            queries = "  (scores the prompt's queries)" if info["needs_queries"] else ""
            print(f"{info['name']:<16} eviction policy (--evict){queries}")
        else:
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
            flag = "--evict-knob" if info["kind"] == "eviction" else "--knob"
            default = f"{knob['name']}={knob['default']}"
            print(f"    {flag} {default}  allowed {allowed}  {knob.get('help', '')}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from . import load_model, sparse_attention

    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if prompt is None:
        raise UsageError("give --prompt-file FILE or --prompt TEXT")
    setting_from_args(args)  # bad methods, policies and knobs fail before the model loads
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
    setting = setting_from_args(args)
    with (
        torch.inference_mode(),
        sparse_attention(
            model, **setting.hook_kwargs(), min_length=args.min_length, page_size=args.page_size
        ) as stats,
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
        "setting": setting.label,
        "prompt_tokens": ids.shape[1],
        **{
            p: {k: v for k, v in s.items() if k != "layer_density"} if isinstance(s, dict) else s
            for p, s in stats.summary().items()
        },
    }
    print(json.dumps(summary), file=sys.stderr)
    return 0


def min_length_arg(text: str) -> int | str:
    """--min-length: an integer >= 0 or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= 0 or 'auto'") from None


def cmd_bench(args) -> int:
    import torch

    records = []
    if args.plot and args.kind not in ("recall", "memory"):
        raise UsageError(
            f"--plot draws recall or memory curves; it does not apply to bench {args.kind}"
        )
    if args.plot and not args.plot.endswith(".png"):
        raise UsageError(f"--plot {args.plot!r} must name a .png file")
    if args.batch and min(args.batch) < 1:
        raise UsageError(f"--batch {args.batch}: batch sizes must be >= 1")
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
        kernels = [k for k in (args.kernels or "auto,flex").split(",") if k]
        bad = sorted(set(kernels) - {"auto", "cpp", "flex"})
        if bad:
            raise UsageError(f"--kernels {args.kernels!r}: {bad}; allowed: auto, cpp, flex")
        if "flex" in kernels:  # the flex kernel's compile count over varied lengths
            records.append(compile_report(parse_lengths(args.compile_lengths), shape))
            _emit(records[-1], args.json)
        runs = run_kernel_bench(lengths, densities, shape, repeats=args.repeats, kernels=kernels)
        for record in runs:
            records.append(record)
            _emit(record, args.json)
    else:
        from . import load_model
        from .integration.plan import HookOptions

        if args.kind == "recall":
            setting = None
        elif args.kind == "decode":
            setting = settings_from_args(args)
        else:
            setting = setting_from_args(args)
        options = HookOptions(
            dense_layers=frozenset(args.dense_layers),
            min_length=0,
            page_size=args.page_size,
            prefill_backend=args.prefill_backend,
        )
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
        torch.set_grad_enabled(False)
        lengths = parse_lengths(args.lengths or "8k")
        for record in _bench_runs(args, model, tok, setting, options, lengths):
            records.append(record)
            _emit(record, args.json)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.plot:
        from .bench.plots import memory_curves, prompt_memory_curves, recall_curves

        if args.kind == "memory" and records and "prompt_tokens" in records[0]:
            prompt_memory_curves(records, args.plot)
        else:
            (memory_curves if args.kind == "memory" else recall_curves)(records, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _bench_runs(args, model, tok, setting, options, lengths: list[int]):
    if args.kind == "prefill":
        from .bench.prefill import run_prefill_bench

        return run_prefill_bench(
            model, tok, setting, lengths, repeats=args.repeats, options=options
        )
    if args.kind == "decode":
        from .bench.decode import run_decode_bench

        return run_decode_bench(
            model,
            tok,
            setting,
            lengths,
            batches=tuple(args.batch or [1]),
            steps=args.steps,
            options=options,
        )
    if args.kind == "memory":
        return _memory_runs(args, model, tok, setting, options)
    return _recall_runs(args, model, tok, lengths)


def _memory_runs(args, model, tok, setting, options):
    from .bench.memory import dense_window_nll, run_memory_bench, run_prompt_memory

    prompts = parse_lengths(args.prompt_tokens)
    if len(prompts) > 1:  # the sweep: peak memory and KV bytes vs prompt length
        yield from run_prompt_memory(
            model,
            tok,
            setting,
            prompts,
            new_tokens=parse_lengths(args.tokens or "8")[0],
            options=options,
            progress=not args.json,
        )
        return
    tokens = parse_lengths(args.tokens or "20k")[0]
    yield from run_memory_bench(
        model,
        tok,
        setting,
        tokens,
        prompt=prompts[0],
        every=args.every,
        options=options,
        progress=not args.json,
    )
    context = min(prompts[0] + tokens, getattr(model.config, "max_position_embeddings", 0))
    if args.dense_reference and context > args.every:
        yield from dense_window_nll(model, tok, context, args.every)


def _recall_runs(args, model, tok, lengths: list[int]):
    from .bench.recall import run_recall_bench
    from .bench.sweep import expand_settings, parse_grid_args

    methods = args.method.split(",")
    settings = expand_settings(methods, parse_grid_args(args.grid))
    if "dense" not in methods:
        settings = [s for s in settings if s.family != "dense"]
    n = model.config.num_hidden_layers
    layers = tuple(args.layers) if args.layers else tuple(sorted({0, n // 3, 2 * n // 3, n - 1}))
    if args.phase == "decode":
        from .bench.recall import run_decode_recall_bench
        from .types import Phase

        prefill_only = sorted({s.family for s in settings if Phase.DECODE not in s.parts[1].phases})
        if prefill_only:
            raise UsageError(
                f"--phase decode: {', '.join(prefill_only)} select(s) only at prefill; "
                "decode methods: see `sparseattn methods`"
            )

        return run_decode_recall_bench(model, tok, settings, lengths, layers, steps=args.steps)
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
    from .integration.plan import HookOptions
    from .registry import list_methods

    if args.quick:
        args.methods = args.methods or ",".join(QUICK["methods"])
        args.tasks = args.tasks or ",".join(QUICK["tasks"])
        args.lengths = args.lengths or QUICK["lengths"]
        args.samples = args.samples or QUICK["samples"]
        args.grid = args.grid or QUICK["grid"]
    swept_other = args.decode_methods or args.evict or args.setting
    if args.methods:
        methods = args.methods.split(",")
    else:
        methods = ["dense"] if swept_other else list_methods()
    grids = load_grid_file(args.grid_file) if args.grid_file else {}
    for method, knobs in parse_grid_args(args.grid).items():
        grids.setdefault(method, {}).update(knobs)
    settings = expand_settings(
        methods,
        grids,
        decode=args.decode_methods.split(",") if args.decode_methods else [],
        evict=args.evict.split(",") if args.evict else [],
        combos=args.setting or [],
    )
    tasks = parse_task_list(args.tasks) if args.tasks else default_task_specs()
    config = FrontierConfig(
        model=args.model,
        settings=settings,
        tasks=tasks,
        lengths=parse_lengths(args.lengths or "4k,8k"),
        samples=args.samples or 20,
        seed=args.seed,
        options=HookOptions(
            min_length=args.min_length,
            dense_layers=frozenset(args.dense_layers),
            page_size=args.page_size,
        ),
        dtype=args.dtype,
        reuse_prefill=not args.no_prefill_reuse,
    )
    prepare_out_dir(Path(args.out), config, args.resume_anyway)  # before loading anything
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    torch.set_grad_enabled(False)
    print(
        f"frontier: {len(settings)} settings x {len(tasks)} tasks x {len(config.lengths)} "
        f"lengths x "
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
            f"\ninterrupted: every finished record is in {args.out}/results.jsonl; "
            "rerun the same command to resume",
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


def _check_out(text: str) -> Path:
    out = Path(text)
    if out.suffix != ".json":
        raise UsageError(f"--out {text!r} must name a .json file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {text!r}: folder {str(out.parent)!r} does not exist")
    return out


def cmd_profile_duo(args) -> int:
    """``profile --kind duo``: optimise DuoAttention gates, write the profile."""
    import math
    import time

    from . import load_model
    from .bench.duo import DuoTraining, train_gates
    from .bench.duo_profile import passkey_data, write_duo_profile

    lengths = parse_lengths(args.length)
    if len(lengths) != 1:
        raise UsageError(f"--length {args.length!r}: give one length, e.g. 2k")
    length = lengths[0]
    config = DuoTraining(
        sink=args.sink,
        window=args.window,
        length=length,
        steps=args.steps,
        lr=args.lr,
        l1=args.l1,
        seed=args.seed,
        passkeys=args.passkeys,
        words=args.words,
        checkpoint_every=args.checkpoint_every,
    )
    if args.resume and not args.checkpoint:
        raise UsageError("--resume continues the run in --checkpoint DIR; give --checkpoint")
    out = _check_out(args.out)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    start = time.perf_counter()
    data = passkey_data(tok, config, device=next(model.parameters()).device)
    data(0)  # a length too short for the passkeys fails now, not after the model has run
    trainer = train_gates(
        model,
        data,
        config,
        checkpoint=args.checkpoint,
        resume=args.resume,
        progress=not args.no_progress,
    )
    profile = write_duo_profile(str(out), trainer, args.model)
    sliding = set(profile["calibration"]["sliding_layers"])
    for layer, row in enumerate(profile["heads"][0.0]):
        if layer not in sliding:
            gates = " ".join(f"{g:.2f}" for g in row)
            count = profile["summary"][0.0]["retrieval_heads"][layer]
            print(f"layer {layer:2d}: {gates}  ({count} >= 0.5)", file=sys.stderr)
    loss, cpu = profile["calibration"]["loss"], trainer.cpu_seconds
    retrieval = sum(
        n for i, n in enumerate(profile["summary"][0.0]["retrieval_heads"]) if i not in sliding
    )
    print(
        f"loss {loss['total_first']:.4f} -> {loss['total_last']:.4f} (distillation "
        f"{loss['distill_first']:.4f} -> {loss['distill_last']:.4f}); {retrieval} gated heads "
        f">= 0.5; training {trainer.seconds:.0f} s"
        + ("" if math.isnan(cpu) else f" ({cpu:.0f} s of CPU)"),  # nan: not recorded
        file=sys.stderr,
    )
    print(f"profile: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


PROFILE_DEFAULTS = {  # kind: (--lengths, --samples) when not given
    "minference": ("4k", 1),
    "xattention": ("4k", 1),
    "channels": ("4k", 1),
    "retrieval": ("2k,4k", 6),
    "moa": ("2k,4k", 1),
    "duo": ("2k", 1),  # its own --length and --steps
}


def cmd_profile(args) -> int:
    import time

    from . import load_model

    if args.show is not None:
        made = [flag for flag, value in (("--kind", args.kind), ("--out", args.out)) if value]
        if made:
            raise UsageError(
                f"--show FILE prints a profile and cannot be combined with {' / '.join(made)} "
                "(which make one); give either --show FILE [--png OUT.png] or --kind K --out F"
            )
        return cmd_profile_show(args)
    if args.png is not None:
        raise UsageError("--png goes with --show FILE")
    if not args.kind or not args.out:
        raise UsageError(
            "profile needs --kind K and --out FILE.json to make a profile, or --show FILE to "
            f"print one; kinds: {', '.join(PROFILE_DEFAULTS)}"
        )
    if args.kind == "duo":
        return cmd_profile_duo(args)
    default_lengths, default_samples = PROFILE_DEFAULTS[args.kind]
    lengths = parse_lengths(args.lengths or default_lengths)
    samples = args.samples if args.samples is not None else default_samples
    if not lengths or min(lengths) < 256:
        raise UsageError(f"--lengths {args.lengths!r}: give lengths of at least 256 tokens")
    if samples < 1:
        raise UsageError(f"--samples {samples} must be >= 1")
    out = _check_out(args.out)
    if args.kind == "moa" and len(set(lengths)) < 2:
        raise UsageError(f"--lengths {args.lengths!r}: a moa profile needs at least two lengths")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    start = time.perf_counter()
    per_length = samples if args.kind == "retrieval" else 3 * samples
    n_inputs = len(lengths) * per_length
    seen = []

    def progress(label: str) -> None:
        seen.append(label)
        elapsed = time.perf_counter() - start
        print(f"[{len(seen)}/{n_inputs}] {label} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    common = {"model_id": args.model, "lengths": lengths, "seed": args.seed, "samples": samples}
    if args.kind == "retrieval":
        from .bench.retrieval_heads import retrieval_profile

        profile = retrieval_profile(model, tok, progress=progress, **common)
    elif args.kind == "moa":
        from .bench.moa import moa_profile

        profile = moa_profile(
            model,
            tok,
            sink=args.moa_sink,
            response=args.response_tokens,
            progress=progress,
            **common,
        )
    else:
        from .bench.calibrate import calibrate

        profile = calibrate(
            model,
            tok,
            kind=args.kind,
            block_size=args.block_size,
            stride=args.stride,
            last_weight=args.last_weight,
            progress=progress,
            **common,
        )
    from .profiles import save_profile

    save_profile(str(out), **profile)
    for line in _profile_summary(args.kind, profile):
        print(line, file=sys.stderr)
    print(f"profile: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def cmd_profile_show(args) -> int:
    from .profiles.show import show_profile

    png = Path(args.png) if args.png else Path(Path(args.show).stem + ".png")
    if png.suffix != ".png":
        raise UsageError(f"--png {args.png!r} must name a .png file")
    if not png.parent.is_dir():
        raise UsageError(f"--png {args.png!r}: folder {str(png.parent)!r} does not exist")
    print(show_profile(args.show, png))
    print(f"heatmap: {png}", file=sys.stderr)
    return 0


def _profile_summary(kind: str, profile: dict) -> list[str]:
    """One line per level of a calibrated profile: what its heads keep, averaged over layers."""
    lines = []
    if kind == "retrieval":
        row = profile["summary"][0.0]
        for threshold in ("0.1", "0.3"):
            per_layer = row[f"heads>={threshold}"]
            layers = [f"{i}:{n}" for i, n in enumerate(per_layer) if n]
            lines.append(
                f"heads scoring >= {threshold}: {sum(per_layer)} "
                f"(layer:count {' '.join(layers) or 'none'})"
            )
        calibration = profile["calibration"]
        lines.append(
            f"copied needle tokens: {calibration['copied_tokens']} in "
            f"{calibration['prompts']} prompts"
        )
        return lines
    if kind == "moa":
        for level, row in sorted(profile["summary"].items()):
            share = sum(row["share"]) / len(row["share"])
            spans = next(v for k, v in row.items() if k.startswith("span@"))
            span_name = next(k for k in row if k.startswith("span@"))
            lines.append(
                f"budget {level:g}: mean kept share {share:.3f}, predicted loss "
                f"{sum(row['loss']):.4g}, mean {span_name.replace('@', ' at ')} "
                f"{sum(spans) / len(spans):.0f}"
            )
        return lines
    if kind == "channels":
        for r, row in sorted(profile["summary"].items()):
            share = sum(row["share"]) / len(row["share"])
            lines.append(f"top {r:g} channels: mean share of |q.k| channel importance {share:.3f}")
        return lines
    skip = set(profile["calibration"]["sliding_layers"]) if kind == "minference" else set()
    for level, row in sorted(profile["summary"].items()):
        used = [i for i in range(len(row["recall"])) if i not in skip]
        recall = sum(row["recall"][i] for i in used) / len(used)
        density = sum(row["density"][i] for i in used) / len(used)
        name = "budget" if kind == "minference" else "target recall"
        lines.append(f"{name} {level:g}: mean recall {recall:.3f}, mean density {density:.3f}")
    return lines


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
    p = sub.add_parser("generate", help="generate from a prompt with a sparse setting")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    add_setting_args(p, "dense", "registered method (see `sparseattn methods`)")
    p.add_argument("--prompt-file", help="file holding the prompt")
    p.add_argument("--prompt", help="prompt text (instead of --prompt-file)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--min-length",
        type=min_length_arg,
        default="auto",
        help="calls with fewer keys stay dense; 'auto' (default): the crossover measured once on "
        "this machine",
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="speed vs dense, measured in the same run")
    p.add_argument(
        "kind",
        choices=["kernel", "prefill", "decode", "memory", "recall"],
        help="kernel: attention alone; prefill / decode: the whole model; memory: a long stream "
        "token by token (cache bytes, RSS, s/token, NLL); recall: share of the true attention "
        "mass kept vs measured density",
    )
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument(
        "--lengths", help="comma list, e.g. 4k,8k,16k,32k (kernel default; prefill default 8k)"
    )
    p.add_argument("--densities", help="kernel: target block densities, default 0.05,0.1,0.25,0.5")
    p.add_argument("--block-size", type=int, default=128, help="kernel: tile size")
    p.add_argument(
        "--prefill-backend",
        default="auto",
        help="prefill/decode/memory/recall: auto (C++ kernel for float32 on the CPU, else "
        "FlexAttention), cpp, flex or reference",
    )
    p.add_argument(
        "--kernels",
        help="kernel: comma list of auto, cpp, flex (default auto,flex: the kernel the hook picks "
        "here, then FlexAttention)",
    )
    p.add_argument(
        "--compile-lengths",
        default="1000,3000,5000,7000",
        help="kernel: varied lengths for the compile count",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--steps", type=int, default=16, help="decode: tokens timed (median)")
    p.add_argument(
        "--batch", type=int, nargs="*", help="decode: batch sizes, e.g. --batch 1 4 (default 1)"
    )
    p.add_argument(
        "--tokens",
        help="memory: tokens streamed after the prompt (default 20k), or generated after each "
        "prompt of a --prompt-tokens sweep (default 8)",
    )
    p.add_argument(
        "--prompt-tokens",
        default="1024",
        help="memory: prompt length; a comma list (e.g. 8k,16k,32k) measures peak memory and KV "
        "bytes vs prompt length instead of a stream (chunked with chunk=N in --setting)",
    )
    p.add_argument("--every", type=int, default=512, help="memory: tokens per record")
    p.add_argument(
        "--dense-reference",
        action="store_true",
        help="memory: also the dense NLL of the same text inside the model's context",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model: {model_help}")
    add_setting_args(
        p,
        "streaming",
        "prefill/decode/memory: method compared with dense; recall: comma list of methods",
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
    p.add_argument(
        "--phase",
        choices=["prefill", "decode"],
        default="prefill",
        help="recall: score prefill tile selections, or decode selections on real decode steps "
        "(--steps of them after a prompt of each length; every layer is captured)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the records to this JSONL file")
    p.add_argument("--plot", metavar="FILE.png", help="recall: recall-vs-density curves")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "frontier", help="the sweep: accuracy, measured density and speed of every setting"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument(
        "--methods",
        help="comma list of methods, each for every phase it supports (default: every registered "
        "method, or only dense when --decode-methods, --evict or --setting is given)",
    )
    p.add_argument(
        "--decode-methods", help="comma list of decode methods, each after a dense prefill"
    )
    p.add_argument("--evict", help="comma list of eviction policies, each with dense attention")
    p.add_argument(
        "--setting",
        action="append",
        help="an explicit setting, repeatable, e.g. 'prefill=xattention;decode=quest[budget=512]'",
    )
    p.add_argument("--page-size", type=int, default=16, help="cache page size in tokens")
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
        help="knob values to sweep, repeatable; evict:POLICY.KNOB=... for a policy",
    )
    p.add_argument(
        "--grid-file",
        help='TOML file: one [method] (or ["evict:policy"]) table with knob = [values]',
    )
    p.add_argument(
        "--quick", action="store_true", help="small set that finishes in minutes on a CPU"
    )
    p.add_argument(
        "--min-length",
        type=min_length_arg,
        default=0,
        help="calls with fewer keys stay dense (an integer, or 'auto': the measured crossover)",
    )
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers kept dense")
    p.add_argument(
        "--resume-anyway", action="store_true", help="add to a DIR made with another configuration"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-prefill-reuse",
        action="store_true",
        help="prefill every setting itself, even those that prefill as dense does (slower; "
        "for measuring what the reuse saves)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", required=True, help="output directory (results.jsonl, summary.csv, report.*)"
    )
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser(
        "profile",
        help="per-head profiles: calibrate patterns (minference), thresholds (xattention), "
        "channel rankings (channels), retrieval scores (retrieval), DuoAttention gates (duo) or "
        "span rules (moa) for a model, or --show one",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument(
        "--kind",
        choices=list(PROFILE_DEFAULTS),
        help="minference: a pattern per head per tile-density budget; xattention: a threshold "
        "per head per target recall; channels: each KV head's channels ranked by mean |q_d k_d|; "
        "retrieval: each head's retrieval score on needle copying; moa: a span rule per KV head "
        "per KV budget; duo: a DuoAttention gate per KV head, optimised on generated passkey "
        "retrieval",
    )
    p.add_argument("--out", help="the profile to write, FILE.json")
    p.add_argument(
        "--show",
        metavar="FILE",
        help="print the per-layer x per-head map of a profile (a file or a shipped name) and "
        "write its heatmap (instead of --kind/--out)",
    )
    p.add_argument("--png", help="with --show: the heatmap to write (default ./NAME.png)")
    p.add_argument(
        "--lengths",
        help="calibration input lengths (default 4k; retrieval and moa: 2k,4k)",
    )
    p.add_argument(
        "--samples",
        type=int,
        help="inputs per (length, calibration task) (default 1; retrieval: 6 prompts per length)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated calibration inputs")
    p.add_argument(
        "--block-size",
        type=int,
        default=128,
        choices=[16, 32, 64, 128, 256],
        help="tile size (minference, xattention)",
    )
    p.add_argument("--stride", type=int, default=8, choices=[4, 8, 16], help="xattention stride")
    p.add_argument(
        "--last-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="minference, xattention: judge each head by (1 - W) x its recall over every query "
        "+ W x its recall over the last query tile (default 0)",
    )
    duo = p.add_argument_group("duo (DuoAttention gate optimisation)")
    duo.add_argument("--length", default="2k", help="tokens per training sample (default 2k)")
    duo.add_argument("--steps", type=int, default=150, help="optimisation steps (default 150)")
    duo.add_argument("--sink", type=int, default=128, help="streaming sink tokens (default 128)")
    duo.add_argument(
        "--window", type=int, default=256, help="streaming recent tokens (default 256)"
    )
    duo.add_argument("--lr", type=float, default=0.02, help="peak learning rate (default 0.02)")
    duo.add_argument("--l1", type=float, default=0.05, help="L1 weight on the gates (default 0.05)")
    duo.add_argument("--passkeys", type=int, default=10, help="passkeys per sample (default 10)")
    duo.add_argument("--words", type=int, default=8, help="words per passkey (default 8)")
    duo.add_argument("--checkpoint", metavar="DIR", help="folder for checkpoints (duo-gates.pt)")
    duo.add_argument(
        "--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)"
    )
    duo.add_argument("--resume", action="store_true", help="continue the run in --checkpoint DIR")
    duo.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--moa-sink", type=int, default=64, help="moa: first tokens every span rule keeps (64)"
    )
    p.add_argument(
        "--response-tokens",
        type=int,
        default=32,
        help="moa: tokens of the model's own greedy response the loss is taken on (32)",
    )
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

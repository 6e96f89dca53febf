"""``sparseattn frontier``: the sweep of accuracy, measured density and speed of every setting."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .args import add_dtype_device_args, add_model_arg, min_length_arg, parse_lengths

# --quick: dense and the settings the measured frontier recommends (docs/results.md), at the
# lengths where sparse prefill pays on a CPU (crossover 2K-4K), on the needle task in RULER's
# format; each flag given on the command line replaces its part
QUICK = {
    "settings": [
        "tri_shape[window=1024]",  # faster prefill that kept accuracy at 4K and 8K (prefill only)
        "decode=tokenselect[budget=1024]",  # sparse decode that kept accuracy
        "evict=pyramidkv[compression=0.5]",  # about half the KV
        "evict=streaming[sink=128,window=1024]",  # KV bounded by sink + window
        "prefill=tri_shape[window=1024];decode=tokenselect[budget=1024];"
        "evict=pyramidkv[compression=0.5]",  # all three phases at once
    ],
    "tasks": ["niah_single:format=ruler"],
    "lengths": "4k,8k",
    "samples": 4,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "frontier", help="the sweep: accuracy, measured density and speed of every setting"
    )
    add_model_arg(p)
    p.add_argument(
        "--methods",
        help="comma list of methods, each for every phase it supports (default: every registered "
        "method that binds to the model, those lacking a trained file for it left out by name; "
        "only dense when --decode-methods, --evict or --setting is given)",
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
        "--quick",
        action="store_true",
        help="dense and the recommended settings (one per goal and one combining all three "
        "phases) on niah_single in RULER's format at 4k,8k, 4 samples: about 10 minutes on a "
        "2-core CPU",
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
    add_dtype_device_args(p)
    p.add_argument(
        "--out", required=True, help="output directory (results.jsonl, summary.csv, report.*)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import load_model
    from ..bench.frontier import FrontierConfig, prepare_out_dir, run_frontier
    from ..bench.report import write_report
    from ..bench.summary import recommendation_lines
    from ..bench.sweep import (
        default_task_specs,
        expand_settings,
        load_grid_file,
        parse_grid_args,
        parse_task_list,
    )
    from ..integration.options import HookOptions
    from ..registry import list_methods

    if args.quick:
        if not (args.methods or args.decode_methods or args.evict or args.setting):
            args.setting = QUICK["settings"]
        args.tasks = args.tasks or ",".join(QUICK["tasks"])
        args.lengths = args.lengths or QUICK["lengths"]
        args.samples = args.samples or QUICK["samples"]
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
    if args.methods:  # named methods: a bad one fails before anything loads
        prepare_out_dir(Path(args.out), config, args.resume_anyway)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if not args.methods:  # every registered method: those that cannot bind here are left out
        config = dataclasses.replace(config, settings=bindable(config.settings, model.config))
        prepare_out_dir(Path(args.out), config, args.resume_anyway)
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
    rows = write_report(args.out)
    print(
        f"report: {args.out}/report.md, {args.out}/report.html, {args.out}/summary.csv",
        file=sys.stderr,
    )
    print("fastest settings that keep dense's accuracy, per length:")
    for line in recommendation_lines(rows):
        print("  " + line)
    return 0


def bindable(settings: list, model_config) -> list:
    """The settings whose methods bind to this model; each one left out is named on stderr
    with the reason (a trained profile or gate file that does not exist for this model)."""
    from ..errors import UsageError
    from ..registry import build_method

    kept = []
    for setting in settings:
        try:
            for spec in {
                setting.prefill.name: setting.prefill,
                setting.decode.name: setting.decode,
            }.values():
                build_method(spec.name, **spec.knobs).bind(model_config)
        except UsageError as err:
            print(f"frontier: {setting.label} left out: {err}", file=sys.stderr)
            continue
        kept.append(setting)
    return kept

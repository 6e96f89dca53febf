"""``sparseattn bench recall``: the share of the true attention mass each setting's selections
keep against their measured density, on prefill tiles or on real decode steps."""

from __future__ import annotations

import argparse
import sys

from ...errors import UsageError
from ..args import add_dtype_device_args, add_model_arg, parse_lengths
from .common import add_record_args, check_plot, emit_records, load


def add_parser(kinds: argparse._SubParsersAction) -> None:
    about = "recall of the true attention mass vs measured density"
    p = kinds.add_parser("recall", help=about, description=about)
    add_model_arg(p)
    p.add_argument(
        "--method", default="streaming", help="comma list of methods (see `sparseattn methods`)"
    )
    p.add_argument(
        "--grid",
        action="append",
        metavar="METHOD.KNOB=V1,V2",
        help="knob values to sweep (each method's default grid otherwise)",
    )
    p.add_argument("--lengths", help="comma list of prompt lengths, e.g. 4k,8k (default 8k)")
    p.add_argument("--layers", type=int, nargs="*", help="layers to capture (default: 4)")
    p.add_argument(
        "--phase",
        choices=["prefill", "decode"],
        default="prefill",
        help="score prefill tile selections, or decode selections on real decode steps "
        "(--steps of them after a prompt of each length; every layer is captured)",
    )
    p.add_argument("--steps", type=int, default=16, help="with --phase decode: decode steps")
    p.add_argument("--plot", metavar="FILE.png", help="recall-vs-density curves")
    add_dtype_device_args(p)
    add_record_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...bench.sweep import expand_settings, parse_grid_args

    check_plot(args)
    methods = args.method.split(",")
    settings = expand_settings(methods, parse_grid_args(args.grid))
    if "dense" not in methods:
        settings = [s for s in settings if s.family != "dense"]
    if args.phase == "decode":
        from ...types import Phase

        prefill_only = sorted({s.family for s in settings if Phase.DECODE not in s.parts[1].phases})
        if prefill_only:
            raise UsageError(
                f"--phase decode: {', '.join(prefill_only)} select(s) only at prefill; "
                "decode methods: see `sparseattn methods`"
            )
    lengths = parse_lengths(args.lengths or "8k")
    model, tok = load(args)
    n = model.config.num_hidden_layers
    layers = tuple(args.layers) if args.layers else tuple(sorted({0, n // 3, 2 * n // 3, n - 1}))
    if args.phase == "decode":
        from ...bench.recall import run_decode_recall_bench

        runs = run_decode_recall_bench(model, tok, settings, lengths, layers, steps=args.steps)
    else:
        from ...bench.recall import run_recall_bench

        runs = run_recall_bench(model, tok, settings, lengths, layers)
    records = emit_records(runs, args)
    if args.plot:
        from ...bench.plots import recall_curves

        recall_curves(records, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0

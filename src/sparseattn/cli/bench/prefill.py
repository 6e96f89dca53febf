"""``sparseattn bench prefill``: the whole model's prefill with its own SDPA, through the hook's
dense path and with the setting, per length; a last record with the crossover length."""

from __future__ import annotations

import argparse

from ..args import add_dtype_device_args, parse_lengths, setting_from_args
from .common import add_record_args, add_setting_run_args, emit_records, hook_options, load


def add_parser(kinds: argparse._SubParsersAction) -> None:
    about = "the whole model's prefill: own SDPA, the hook's dense path, the setting"
    p = kinds.add_parser("prefill", help=about, description=about)
    add_setting_run_args(p)
    p.add_argument("--lengths", help="comma list of prompt lengths, e.g. 2k,4k,8k (default 8k)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per length (median)")
    add_dtype_device_args(p)
    add_record_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...bench.prefill import run_prefill_bench

    setting = setting_from_args(args)
    options = hook_options(args)
    lengths = parse_lengths(args.lengths or "8k")
    model, tok = load(args)
    records = run_prefill_bench(model, tok, setting, lengths, repeats=args.repeats, options=options)
    emit_records(records, args)
    return 0

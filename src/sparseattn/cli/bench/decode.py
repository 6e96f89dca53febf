"""``sparseattn bench decode``: seconds per generated token with its own SDPA, the hook's dense
path and each setting (``--setting`` repeatable, one dense reference), KV bytes and peak
memory."""

from __future__ import annotations

import argparse

from ...errors import UsageError
from ..args import add_dtype_device_args, parse_lengths, settings_from_args
from .common import add_record_args, add_setting_run_args, emit_records, hook_options, load


def add_parser(kinds: argparse._SubParsersAction) -> None:
    about = "seconds per generated token, KV bytes and peak memory; --setting repeatable"
    p = kinds.add_parser("decode", help=about, description=about)
    add_setting_run_args(p)
    p.add_argument("--lengths", help="comma list of prompt lengths, e.g. 4k,8k (default 8k)")
    p.add_argument("--batch", type=int, nargs="*", help="batch sizes, e.g. --batch 1 4 (default 1)")
    p.add_argument("--steps", type=int, default=16, help="tokens timed (median)")
    add_dtype_device_args(p)
    add_record_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...bench.decode import run_decode_bench

    if args.batch and min(args.batch) < 1:
        raise UsageError(f"--batch {args.batch}: batch sizes must be >= 1")
    settings = settings_from_args(args)
    options = hook_options(args)
    lengths = parse_lengths(args.lengths or "8k")
    model, tok = load(args)
    records = run_decode_bench(
        model,
        tok,
        settings,
        lengths,
        batches=tuple(args.batch or [1]),
        steps=args.steps,
        options=options,
    )
    emit_records(records, args)
    return 0

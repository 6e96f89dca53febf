"""``sparseattn bench kernel``: the block-sparse kernels against SDPA on random tiles, attention
alone, and FlexAttention's compile count over varied lengths."""

from __future__ import annotations

import argparse

from ...errors import UsageError
from ..args import parse_lengths
from .common import add_record_args, emit_records

KERNELS = ("auto", "cpp", "flex")


def add_parser(kinds: argparse._SubParsersAction) -> None:
    about = "attention alone: block-sparse kernels vs SDPA on random tiles"
    p = kinds.add_parser("kernel", help=about, description=about)
    p.add_argument("--lengths", help="comma list of key lengths (default 4k,8k,16k,32k)")
    p.add_argument("--densities", help="target block densities (default 0.05,0.1,0.25,0.5)")
    p.add_argument("--block-size", type=int, default=128, help="tile size")
    p.add_argument(
        "--kernels",
        help="comma list of auto, cpp, flex (default auto,flex: the kernel the hook picks "
        "here, then FlexAttention)",
    )
    p.add_argument(
        "--compile-lengths",
        default="1000,3000,5000,7000",
        help="varied lengths for FlexAttention's compile count",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--device", default="cpu")
    add_record_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...bench.kernel import KernelShape, compile_report, run_kernel_bench

    shape = KernelShape(block_size=args.block_size, device=args.device)
    lengths = parse_lengths(args.lengths or "4k,8k,16k,32k")
    try:
        densities = [float(x) for x in (args.densities or "0.05,0.1,0.25,0.5").split(",")]
    except ValueError:
        raise UsageError(f"--densities {args.densities!r}: give numbers, e.g. 0.1,0.25") from None
    kernels = [k for k in (args.kernels or "auto,flex").split(",") if k]
    bad = sorted(set(kernels) - set(KERNELS))
    if bad:
        raise UsageError(f"--kernels {args.kernels!r}: {bad}; allowed: {', '.join(KERNELS)}")

    def records():
        if "flex" in kernels:  # the flex kernel's compile count over varied lengths
            yield compile_report(parse_lengths(args.compile_lengths), shape)
        yield from run_kernel_bench(
            lengths, densities, shape, repeats=args.repeats, kernels=kernels
        )

    emit_records(records(), args)
    return 0

"""``sparseattn report DIR``: rebuild a frontier directory's summary, report and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="rewrite summary.csv, report.md, report.html and plots from DIR"
    )
    p.add_argument("dir", help="a frontier output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.report import write_report

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

"""sparseattn: make a Hugging Face causal LM attend sparsely, and measure what it costs and buys.

The command line: one module per command, each with ``add_parser(sub)`` (its flags) and
``run(args)`` (the command); ``args.py`` holds the argument helpers they share. Heavy imports
(torch, transformers, the benchmarks) stay inside ``run`` so that parsing stays fast.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from . import bench, frontier, generate, methods, profile, report
from .args import (
    add_setting_args,
    min_length_arg,
    parse_knobs,
    parse_lengths,
    setting_from_args,
    settings_from_args,
)

__all__ = [
    "add_setting_args",
    "build_parser",
    "main",
    "min_length_arg",
    "parse_knobs",
    "parse_lengths",
    "setting_from_args",
    "settings_from_args",
]

COMMANDS = (methods, generate, bench, frontier, profile, report)  # in --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2

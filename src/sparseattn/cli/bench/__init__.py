"""``sparseattn bench KIND``: speed against dense measured in the same run, and the share of the
true attention mass a selection keeps.

One module per kind, each with only the flags it reads: ``kernel`` (attention alone),
``prefill`` and ``decode`` (the whole model), ``memory`` (a long stream), ``recall``;
``common.py`` holds what they share.
"""

from __future__ import annotations

import argparse

from . import decode, kernel, memory, prefill, recall

KINDS = (kernel, prefill, decode, memory, recall)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="speed vs dense, measured in the same run",
        description="Speed vs dense, measured in the same run; `sparseattn bench KIND --help` "
        "lists the flags of one kind.",
    )
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind in KINDS:
        kind.add_parser(kinds)

"""What ``profile --kind duo`` and ``--kind seer`` share: one training length, the --resume
check, the frozen model, and the trainer's checkpoint and progress options."""

from __future__ import annotations

import argparse
from typing import Any

from ...errors import UsageError
from ..args import parse_lengths


def training_length(args: argparse.Namespace) -> int:
    """The one length of --length (tokens per training sample)."""
    lengths = parse_lengths(args.length)
    if len(lengths) != 1:
        raise UsageError(f"--length {args.length!r}: give one length, e.g. 2k")
    return lengths[0]


def check_resume(args: argparse.Namespace) -> None:
    """UsageError for --resume without --checkpoint (before any model loads)."""
    if args.resume and not args.checkpoint:
        raise UsageError("--resume continues the run in --checkpoint DIR; give --checkpoint")


def load_frozen_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) of --model in --dtype on --device, in eval mode."""
    from ... import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    return model, tok


def trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments --checkpoint, --resume and --no-progress give a trainer."""
    return {"checkpoint": args.checkpoint, "resume": args.resume, "progress": not args.no_progress}

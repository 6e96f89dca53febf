"""What the bench kinds share: the record flags, the whole-model flags, loading the model, and
printing and writing the records."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from ...errors import UsageError
from ..args import add_model_arg, add_setting_args


def add_record_args(p: argparse.ArgumentParser) -> None:
    """--json and --out: how the records are printed, and where else they go."""
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.add_argument("--out", help="also write the records to this JSONL file")


def add_setting_run_args(p: argparse.ArgumentParser) -> None:
    """--model, the setting flags, and how the hook runs it (prefill, decode, memory)."""
    add_model_arg(p)
    add_setting_args(p, "streaming", "method compared with dense (see `sparseattn methods`)")
    p.add_argument(
        "--prefill-backend",
        default="auto",
        help="auto (C++ kernel for float32 on the CPU, else FlexAttention), cpp, flex or reference",
    )
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layers kept dense")


def hook_options(args: argparse.Namespace):
    """The HookOptions the flags of ``add_setting_run_args`` describe (validated)."""
    from ...integration.options import HookOptions

    return HookOptions(
        dense_layers=frozenset(args.dense_layers),
        min_length=0,
        page_size=args.page_size,
        prefill_backend=args.prefill_backend,
    )


def load(args: argparse.Namespace):
    """(model, tokenizer) from --model, --dtype and --device, with autograd off."""
    import torch

    from ... import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    torch.set_grad_enabled(False)
    return model, tok


def check_plot(args: argparse.Namespace) -> None:
    if args.plot and not args.plot.endswith(".png"):
        raise UsageError(f"--plot {args.plot!r} must name a .png file")


def emit_records(records: Iterable[dict], args: argparse.Namespace) -> list[dict]:
    """Print each record as it comes (one JSON line with --json, else key=value pairs), then
    write them all to --out."""
    kept = []
    for record in records:
        kept.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept

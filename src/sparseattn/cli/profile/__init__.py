"""``sparseattn profile``: make a per-head profile for a model (``--kind K --out F``), or print
one (``--show F``).

The calibrated kinds run in ``calibrate.py``, DuoAttention's gate optimisation in ``duo.py``,
SeerAttention's gate training in ``seer.py``, activation thresholds in ``activations.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import UsageError
from ..args import add_dtype_device_args, add_model_arg
from .calibrate import PROFILE_DEFAULTS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="per-head profiles: calibrate patterns (minference), thresholds (xattention), "
        "channel rankings (channels), retrieval scores (retrieval), DuoAttention gates (duo) or "
        "span rules (moa) for a model, SeerAttention gates (seer), activation thresholds "
        "(activations), or --show one",
    )
    add_model_arg(p)
    p.add_argument(
        "--kind",
        choices=list(PROFILE_DEFAULTS),
        help="minference: a pattern per head per tile-density budget; xattention: a threshold "
        "per head per target recall; channels: each KV head's channels ranked by mean |q_d k_d|; "
        "retrieval: each head's retrieval score on needle copying; moa: a span rule per KV head "
        "per KV budget; duo: a DuoAttention gate per KV head, optimised on generated passkey "
        "retrieval; seer: SeerAttention's tile gates, trained by self-distillation (a .safetensors "
        "file); activations: per-layer |x| thresholds of every linear input and the MLP "
        "activation (cats, teal, rsparse), rsparse's budget split and teal's greedy allocation",
    )
    p.add_argument("--out", help="the profile to write, FILE.json (seer: FILE.safetensors)")
    p.add_argument(
        "--show",
        metavar="FILE",
        help="print the per-layer x per-head map of a profile (a file or a shipped name) and "
        "write its heatmap (instead of --kind/--out)",
    )
    p.add_argument("--png", help="with --show: the heatmap to write (default ./NAME.png)")
    p.add_argument(
        "--lengths",
        help="calibration input lengths (default 4k; retrieval and moa: 2k,4k)",
    )
    p.add_argument(
        "--samples",
        type=int,
        help="inputs per (length, calibration task) (default 1; retrieval: 6 prompts per length)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated calibration inputs")
    p.add_argument(
        "--block-size",
        type=int,
        choices=[16, 32, 64, 128, 256],
        help="tile size (minference, xattention: default 128; seer: default 64)",
    )
    p.add_argument("--stride", type=int, default=8, choices=[4, 8, 16], help="xattention stride")
    p.add_argument(
        "--last-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="minference, xattention: judge each head by (1 - W) x its recall over every query "
        "+ W x its recall over the last query tile (default 0)",
    )
    duo = p.add_argument_group("duo, seer (DuoAttention and SeerAttention gate training)")
    duo.add_argument("--length", default="2k", help="tokens per training sample (default 2k)")
    duo.add_argument("--steps", type=int, help="optimisation steps (default: duo 150, seer 200)")
    duo.add_argument("--sink", type=int, default=128, help="streaming sink tokens (default 128)")
    duo.add_argument(
        "--window", type=int, default=256, help="streaming recent tokens (default 256)"
    )
    duo.add_argument("--lr", type=float, help="peak learning rate (default: duo 0.02, seer 0.001)")
    duo.add_argument("--l1", type=float, default=0.05, help="L1 weight on the gates (default 0.05)")
    duo.add_argument("--passkeys", type=int, default=10, help="passkeys per sample (default 10)")
    duo.add_argument("--words", type=int, default=8, help="words per passkey (default 8)")
    duo.add_argument(
        "--gate-dim", type=int, default=32, help="seer: gate projection size (default 32)"
    )
    duo.add_argument(
        "--checkpoint", metavar="DIR", help="folder for checkpoints (duo-gates.pt, seer-gates.pt)"
    )
    duo.add_argument(
        "--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)"
    )
    duo.add_argument("--resume", action="store_true", help="continue the run in --checkpoint DIR")
    duo.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--moa-sink", type=int, default=64, help="moa: first tokens every span rule keeps (64)"
    )
    p.add_argument(
        "--response-tokens",
        type=int,
        default=32,
        help="moa: tokens of the model's own greedy response the loss is taken on (32)",
    )
    add_dtype_device_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """--show prints a profile; --kind K --out F makes one (duo by training, else calibration)."""
    if args.show is not None:
        made = [flag for flag, value in (("--kind", args.kind), ("--out", args.out)) if value]
        if made:
            raise UsageError(
                f"--show FILE prints a profile and cannot be combined with {' / '.join(made)} "
                "(which make one); give either --show FILE [--png OUT.png] or --kind K --out F"
            )
        return run_show(args)
    if args.png is not None:
        raise UsageError("--png goes with --show FILE")
    if not args.kind or not args.out:
        raise UsageError(
            "profile needs --kind K and --out FILE.json to make a profile, or --show FILE to "
            f"print one; kinds: {', '.join(PROFILE_DEFAULTS)}"
        )
    if args.kind == "duo":
        from .duo import run_duo

        return run_duo(args)
    if args.kind == "seer":
        from .seer import run_seer

        return run_seer(args)
    if args.kind == "activations":
        from .activations import run_activations

        return run_activations(args)
    from .calibrate import run_calibration

    return run_calibration(args)


def run_show(args: argparse.Namespace) -> int:
    """``profile --show FILE [--png OUT.png]``: the per-layer x per-head map and its heatmap."""
    from ...profiles.show import show_profile

    png = Path(args.png) if args.png else Path(Path(args.show).stem + ".png")
    if png.suffix != ".png":
        raise UsageError(f"--png {args.png!r} must name a .png file")
    if not png.parent.is_dir():
        raise UsageError(f"--png {args.png!r}: folder {str(png.parent)!r} does not exist")
    print(show_profile(args.show, png))
    print(f"heatmap: {png}", file=sys.stderr)
    return 0

"""``profile --kind activations``: per-layer activation thresholds (CATS, TEAL, R-Sparse) and
R-Sparse's per-layer budget split, calibrated on the project's generated texts."""

from __future__ import annotations

import argparse
import sys
import time

from .calibrate import calibration_args


def run_activations(args: argparse.Namespace) -> int:
    from ... import load_model
    from ...activation import save_activation_profile
    from ...bench.activations import activation_profile
    from ...bench.calibrate import CALIBRATION_TASKS, calibration_inputs

    lengths, samples, out = calibration_args(args)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    start = time.perf_counter()

    def progress(label: str) -> None:
        print(f"{label} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    inputs = calibration_inputs(tok, lengths, args.seed, samples)
    calibration = {
        "lengths": lengths,
        "seed": args.seed,
        "samples": samples,
        "tasks": list(CALIBRATION_TASKS),
    }
    profile = activation_profile(
        model,
        inputs,
        model_id=args.model,
        calibration=calibration,
        seed=args.seed,
        progress=progress,
    )
    save_activation_profile(out, **profile)
    for level, row in profile["summary"].items():
        means = ", ".join(f"{site} {t:.3g}" for site, t in row["threshold_mean"].items())
        print(f"sparsity {level}: mean threshold {means}", file=sys.stderr)
        if row["rsparse_share_mean"] is not None:
            print(
                f"sparsity {level}: rsparse mean share on exact channels "
                f"{row['rsparse_share_mean']}",
                file=sys.stderr,
            )
    print(f"profile: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0

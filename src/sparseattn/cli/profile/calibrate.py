"""``profile --kind minference|xattention|channels|retrieval|moa``: calibrate a profile on
generated inputs, write it, and print one line per level of what its heads keep."""

from __future__ import annotations

import argparse
import sys

from ...errors import UsageError
from ..args import json_out_path, parse_lengths

PROFILE_DEFAULTS = {  # kind: (--lengths, --samples) when not given
    "minference": ("4k", 1),
    "xattention": ("4k", 1),
    "channels": ("4k", 1),
    "retrieval": ("2k,4k", 6),
    "moa": ("2k,4k", 1),
    "duo": ("2k", 1),  # its own --length and --steps
    "seer": ("2k", 1),  # its own --length and --steps (cli/profile/seer.py)
    "activations": ("2k", 1),  # cli/profile/activations.py
}


def calibration_args(args: argparse.Namespace) -> tuple[list[int], int, object]:
    """(lengths, samples, out path) of a profile run: the kind's defaults where a flag is not
    given, checked before any model loads."""
    default_lengths, default_samples = PROFILE_DEFAULTS[args.kind]
    lengths = parse_lengths(args.lengths or default_lengths)
    samples = args.samples if args.samples is not None else default_samples
    if not lengths or min(lengths) < 256:
        raise UsageError(f"--lengths {args.lengths!r}: give lengths of at least 256 tokens")
    if samples < 1:
        raise UsageError(f"--samples {samples} must be >= 1")
    return lengths, samples, json_out_path(args.out)


def run_calibration(args: argparse.Namespace) -> int:
    import time

    from ... import load_model

    lengths, samples, out = calibration_args(args)
    if args.kind == "moa" and len(set(lengths)) < 2:
        raise UsageError(f"--lengths {args.lengths!r}: a moa profile needs at least two lengths")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    start = time.perf_counter()
    per_length = samples if args.kind == "retrieval" else 3 * samples
    n_inputs = len(lengths) * per_length
    seen = []

    def progress(label: str) -> None:
        seen.append(label)
        elapsed = time.perf_counter() - start
        print(f"[{len(seen)}/{n_inputs}] {label} ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    common = {"model_id": args.model, "lengths": lengths, "seed": args.seed, "samples": samples}
    if args.kind == "retrieval":
        from ...bench.retrieval_heads import retrieval_profile

        profile = retrieval_profile(model, tok, progress=progress, **common)
    elif args.kind == "moa":
        from ...bench.moa import moa_profile

        profile = moa_profile(
            model,
            tok,
            sink=args.moa_sink,
            response=args.response_tokens,
            progress=progress,
            **common,
        )
    else:
        from ...bench.calibrate import calibrate

        profile = calibrate(
            model,
            tok,
            kind=args.kind,
            block_size=args.block_size or 128,
            stride=args.stride,
            last_weight=args.last_weight,
            progress=progress,
            **common,
        )
    from ...profiles import save_profile

    save_profile(str(out), **profile)
    for line in summary_lines(args.kind, profile):
        print(line, file=sys.stderr)
    print(f"profile: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def summary_lines(kind: str, profile: dict) -> list[str]:
    """One line per level of a calibrated profile: what its heads keep, averaged over layers."""
    lines = []
    if kind == "retrieval":
        row = profile["summary"][0.0]
        for threshold in ("0.1", "0.3"):
            per_layer = row[f"heads>={threshold}"]
            layers = [f"{i}:{n}" for i, n in enumerate(per_layer) if n]
            lines.append(
                f"heads scoring >= {threshold}: {sum(per_layer)} "
                f"(layer:count {' '.join(layers) or 'none'})"
            )
        calibration = profile["calibration"]
        lines.append(
            f"copied needle tokens: {calibration['copied_tokens']} in "
            f"{calibration['prompts']} prompts"
        )
        return lines
    if kind == "moa":
        for level, row in sorted(profile["summary"].items()):
            share = sum(row["share"]) / len(row["share"])
            spans = next(v for k, v in row.items() if k.startswith("span@"))
            span_name = next(k for k in row if k.startswith("span@"))
            lines.append(
                f"budget {level:g}: mean kept share {share:.3f}, predicted loss "
                f"{sum(row['loss']):.4g}, mean {span_name.replace('@', ' at ')} "
                f"{sum(spans) / len(spans):.0f}"
            )
        return lines
    if kind == "channels":
        for r, row in sorted(profile["summary"].items()):
            share = sum(row["share"]) / len(row["share"])
            lines.append(f"top {r:g} channels: mean share of |q.k| channel importance {share:.3f}")
        return lines
    skip = set(profile["calibration"]["sliding_layers"]) if kind == "minference" else set()
    for level, row in sorted(profile["summary"].items()):
        used = [i for i in range(len(row["recall"])) if i not in skip]
        recall = sum(row["recall"][i] for i in used) / len(used)
        density = sum(row["density"][i] for i in used) / len(used)
        name = "budget" if kind == "minference" else "target recall"
        lines.append(f"{name} {level:g}: mean recall {recall:.3f}, mean density {density:.3f}")
    return lines

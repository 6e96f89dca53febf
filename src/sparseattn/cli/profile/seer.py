"""``profile --kind seer``: train SeerAttention gates by self-distillation on generated inputs,
write the gate file, and print the loss and the time per step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import UsageError
from .training import check_resume, load_frozen_model, trainer_options, training_length


def gate_out_path(text: str) -> Path:
    """--out FILE.safetensors in an existing folder (checked before any model loads)."""
    from ...profiles.gates import SUFFIX

    out = Path(text)
    if out.suffix != SUFFIX:
        raise UsageError(f"--out {text!r}: seer gates are written to a {SUFFIX} file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {text!r}: folder {str(out.parent)!r} does not exist")
    return out


def run_seer(args: argparse.Namespace) -> int:
    import time

    from ...bench.seer import CHECKPOINT, SeerTraining, train_seer_gates
    from ...bench.seer_gates import seer_data, write_seer_gates
    from ...bench.training import refuse_existing

    given = {"block_size": args.block_size, "steps": args.steps, "lr": args.lr}
    config = SeerTraining(
        length=training_length(args),
        gate_dim=args.gate_dim,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        **{k: v for k, v in given.items() if v is not None},  # else the trainer's defaults
    )
    check_resume(args)
    out = gate_out_path(args.out)
    if args.checkpoint and not args.resume:
        refuse_existing(Path(args.checkpoint) / CHECKPOINT)  # before the model loads
    model, tok = load_frozen_model(args)
    start = time.perf_counter()
    data = seer_data(tok, config, device=next(model.parameters()).device)
    trainer = train_seer_gates(model, data, config, **trainer_options(args))
    training = write_seer_gates(out, trainer, args.model)
    steps = max(trainer.step, 1)
    print(
        f"KL {training['kl_first']:.4f} -> {training['kl_last']:.4f} over {trainer.step} steps; "
        f"{len(trainer.gated_layers())} gated layers (sliding: {sorted(trainer.sliding_layers)}); "
        f"training {trainer.seconds:.0f} s, {trainer.seconds / steps:.1f} s per step "
        f"({trainer.cpu_seconds / steps:.1f} s of CPU)",
        file=sys.stderr,
    )
    size = out.stat().st_size / 1e6
    print(f"gates: {out} ({size:.2f} MB, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0

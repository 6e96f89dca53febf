"""``profile --kind duo``: optimise DuoAttention gates on generated passkey retrieval, write the
profile, and print each layer's gates."""

from __future__ import annotations

import argparse
import sys

from ..args import json_out_path
from .training import check_resume, load_frozen_model, trainer_options, training_length


def run_duo(args: argparse.Namespace) -> int:
    import math
    import time

    from ...bench.duo import DuoTraining, train_gates
    from ...bench.duo_profile import passkey_data, write_duo_profile

    config = DuoTraining(
        sink=args.sink,
        window=args.window,
        length=training_length(args),
        steps=150 if args.steps is None else args.steps,
        lr=0.02 if args.lr is None else args.lr,
        l1=args.l1,
        seed=args.seed,
        passkeys=args.passkeys,
        words=args.words,
        checkpoint_every=args.checkpoint_every,
    )
    check_resume(args)
    out = json_out_path(args.out)
    model, tok = load_frozen_model(args)
    start = time.perf_counter()
    data = passkey_data(tok, config, device=next(model.parameters()).device)
    data(0)  # a length too short for the passkeys fails now, not after the model has run
    trainer = train_gates(model, data, config, **trainer_options(args))
    profile = write_duo_profile(str(out), trainer, args.model)
    sliding = set(profile["calibration"]["sliding_layers"])
    for layer, row in enumerate(profile["heads"][0.0]):
        if layer not in sliding:
            gates = " ".join(f"{g:.2f}" for g in row)
            count = profile["summary"][0.0]["retrieval_heads"][layer]
            print(f"layer {layer:2d}: {gates}  ({count} >= 0.5)", file=sys.stderr)
    loss, cpu = profile["calibration"]["loss"], trainer.cpu_seconds
    retrieval = sum(
        n for i, n in enumerate(profile["summary"][0.0]["retrieval_heads"]) if i not in sliding
    )
    print(
        f"loss {loss['total_first']:.4f} -> {loss['total_last']:.4f} (distillation "
        f"{loss['distill_first']:.4f} -> {loss['distill_last']:.4f}); {retrieval} gated heads "
        f">= 0.5; training {trainer.seconds:.0f} s"
        + ("" if math.isnan(cpu) else f" ({cpu:.0f} s of CPU)"),  # nan: not recorded
        file=sys.stderr,
    )
    print(f"profile: {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0

"""A ``duo`` profile from a gate optimisation run (``sparseattn profile --kind duo``).

``heads[0][layer][kv_head]`` is the head's trained gate in [0, 1] (1 on sliding-window
layers, which are not gated); ``summary[0]`` gives per layer the mean gate of its KV heads and
how many end at or above 0.5 (retrieval heads at DuoAttention's threshold). ``calibration``
records the run's knobs, the sliding layers, the number of samples (one per step) and the loss
curve: the total loss (distillation + l1 x sum of gates) and the distillation loss alone, at
the first step, over the last steps, and averaged over ten equal parts of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch

from ..profiles import fingerprint, save_profile
from .duo import DuoTraining, GateTrainer, Sample
from .tasks.passkey import passkey_sample

RETRIEVAL_THRESHOLD = 0.5
CURVE_PARTS = 10


def passkey_data(tokenizer, config: DuoTraining, device: Any = "cpu") -> Callable[[int], Sample]:
    """``data(i)``: the i-th generated passkey sample of the run, as (1, L) ids and the
    first answer position."""

    def data(index: int) -> Sample:
        sample = passkey_sample(
            tokenizer, config.length, config.seed, index, config.passkeys, config.words
        )
        return torch.tensor([sample.input_ids], device=device), sample.answer_start

    return data


def _curve(values: list[float]) -> list[float]:
    """Means over up to CURVE_PARTS equal consecutive parts."""
    parts = min(CURVE_PARTS, len(values))
    bounds = [round(i * len(values) / parts) for i in range(parts + 1)]
    return [round(sum(values[a:b]) / (b - a), 6) for a, b in pairwise(bounds)]


def loss_summary(history: list[tuple[float, float]], l1: float) -> dict[str, Any]:
    """First / last / curve of the total and distillation losses of a run."""
    distill = [d for d, _ in history]
    total = [d + l1 * r for d, r in history]
    tail = max(1, len(history) // 10)
    return {
        "total_first": round(total[0], 6),
        "total_last": round(sum(total[-tail:]) / tail, 6),
        "distill_first": round(distill[0], 6),
        "distill_last": round(sum(distill[-tail:]) / tail, 6),
        "last_steps": tail,
        "total_curve": _curve(total),
        "distill_curve": _curve(distill),
    }


def duo_profile(trainer: GateTrainer, model_id: str) -> dict[str, Any]:
    """The keyword arguments of ``save_profile`` for a finished (or stopped) run."""
    gates = trainer.gates.detach().cpu().clamp(0.0, 1.0)  # (layers, Hkv)
    gates[~trainer.gated_rows().cpu()] = 1.0
    table = [[round(float(g), 5) for g in row] for row in gates]
    summary = {
        "mean_gate": [round(sum(row) / len(row), 4) for row in table],
        "retrieval_heads": [sum(g >= RETRIEVAL_THRESHOLD for g in row) for row in table],
    }
    calibration = {
        **trainer.config.recorded(),
        "lengths": [trainer.config.length],
        "samples": trainer.step,
        "sliding_layers": sorted(trainer.sliding_layers),
        "threshold": RETRIEVAL_THRESHOLD,
        "data": "generated passkey retrieval (bench/tasks/passkey.py), loss on the answer",
        "seconds": round(trainer.seconds, 1),
        "cpu_seconds": None if math.isnan(trainer.cpu_seconds) else round(trainer.cpu_seconds, 1),
        "loss": loss_summary(trainer.history, trainer.config.l1),
    }
    return {
        "kind": "duo",
        "model": {"id": model_id, **fingerprint(trainer.model.config)},
        "calibration": calibration,
        "heads": {0.0: table},
        "summary": {0.0: summary},
        "choices": None,
    }


def write_duo_profile(path: str, trainer: GateTrainer, model_id: str) -> dict[str, Any]:
    """Save the run's profile; returns what was saved."""
    profile = duo_profile(trainer, model_id)
    save_profile(path, **profile)
    return profile

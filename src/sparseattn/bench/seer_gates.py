"""A SeerAttention gate file from a training run (``sparseattn profile --kind seer``), and the
run's data: the project's generated long inputs, sample i from (seed, i).

The file (``profiles/gates.py``) holds the gated layers' projections and a header recording the
model, the gate's shape and the run: its knobs, samples (one per step), wall and CPU seconds and
the KL at the first step, over the last tenth of the steps, and averaged over ten equal parts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..profiles import fingerprint
from ..profiles.gates import POOLS, save_gates
from .seer import ROPE_BASE, SeerTrainer, SeerTraining


def seer_data(
    tokenizer, config: SeerTraining, device: Any = "cpu"
) -> Callable[[int], torch.Tensor]:
    """``data(i)``: sample i of the run, (1, L) ids of the calibration tasks in turn."""
    from .calibrate import CALIBRATION_TASKS
    from .tasks import build_task

    def data(index: int) -> torch.Tensor:
        name = CALIBRATION_TASKS[index % len(CALIBRATION_TASKS)]
        sample = index // len(CALIBRATION_TASKS)
        ids = build_task(name).generate(tokenizer, config.length, config.seed, sample).input_ids
        return torch.tensor([ids], device=device)

    return data


def _curve(values: list[float], parts: int = 10) -> list[float]:
    """Means over up to ``parts`` equal consecutive parts."""
    parts = min(parts, len(values))
    if parts == 0:
        return []
    bounds = [round(i * len(values) / parts) for i in range(parts + 1)]
    return [round(sum(values[a:z]) / (z - a), 6) for a, z in itertools.pairwise(bounds)]


def write_seer_gates(path: str | Path, trainer: SeerTrainer, model_id: str) -> dict[str, Any]:
    """Save the run's gate file (the gated layers only); returns its header's training part."""
    layers = trainer.gated_layers()
    history = trainer.history
    tail = max(1, len(history) // 10)
    training = {
        **trainer.config.recorded(),
        "samples": trainer.step,
        "data": "generated fidelity / niah_single / variable_tracking inputs (bench/tasks)",
        "loss": "KL(tile-max-pooled attention || gate softmax), mean over tiles, heads, layers",
        "kl_first": round(history[0], 6) if history else None,
        "kl_last": round(sum(history[-tail:]) / tail, 6) if history else None,
        "kl_curve": _curve(history),
        "seconds": round(trainer.seconds, 1),
        "cpu_seconds": round(trainer.cpu_seconds, 1),
    }
    gate = {
        "block_size": trainer.config.block_size,
        "gate_dim": trainer.config.gate_dim,
        "rope_base": ROPE_BASE,
        "pools": list(POOLS),
        "layers": layers,
        "sliding_layers": sorted(trainer.sliding_layers),
    }
    save_gates(
        path,
        model={"id": model_id, **fingerprint(trainer.model.config)},
        gate=gate,
        training=training,
        q_proj=trainer.q_proj[layers],
        k_proj=trainer.k_proj[layers],
    )
    return training

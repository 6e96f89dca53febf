"""Per-head profile calibration for ``minference`` and ``xattention`` (``sparseattn profile``);
``channels`` profiles (``double_sparsity``) are made by ``bench/channels.py`` on the same inputs.

Queries and keys of every layer are captured from dense forward passes over generated inputs
(the fidelity prose and two harness tasks). For each (layer, head) the exact tile mass is the
oracle; every candidate is scored by recall (kept share of that mass) and measured tile
density, averaged over the inputs. With ``last_weight`` w > 0 the recall a head is judged by
is (1 - w) x the recall over every query + w x the recall over the last query tile alone (the
question and the first answer token read from there: a pattern that keeps most of the mass
on average can still miss the one column the last queries need). Then:

- minference: for each budget, each head takes the candidate pattern with the highest recall
  among those whose density fits the budget (the sparsest candidate if none fits);
- xattention: for each target recall, each head takes the smallest threshold whose recall
  reaches the target (the largest threshold if none does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..backends.masks import BlockLayout
from ..errors import UsageError
from ..methods.estimators import keep_cumulative_mass
from ..methods.oracle import true_tile_mass
from ..methods.xattention import antidiagonal_tile_scores
from ..profiles import fingerprint, save_profile
from ..registry import build_method
from ..types import BlockSelection
from .channels import channel_profile, mean_importance
from .recall import capture_qk

CALIBRATED_KINDS = ("minference", "xattention", "channels")  # retrieval, moa: their own modules
CALIBRATION_TASKS = ("fidelity", "niah_single", "variable_tracking")
MINFERENCE_CHOICES: tuple[dict[str, Any], ...] = (
    *(
        {"pattern": "streaming", "knobs": {"sink": 128, "window": w}}
        for w in (256, 512, 1024, 2048)
    ),
    *(
        {"pattern": "vertical_slash", "knobs": {"vertical_size": n, "slash_size": n}}
        for n in (8, 16, 32, 64, 128)
    ),
    *({"pattern": "block_sparse", "knobs": {"top_k": n}} for n in (2, 4, 8, 16, 32)),
)
MINFERENCE_BUDGETS = (0.1, 0.2, 0.3, 0.5)
XATTENTION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
XATTENTION_TARGETS = (0.8, 0.85, 0.9, 0.95)


def calibration_inputs(
    tokenizer, lengths: list[int], seed: int, samples: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(label, (1, L) ids) for each length, calibration task and sample."""
    from .tasks import build_task

    for length in lengths:
        for name in CALIBRATION_TASKS:
            for sample in range(samples):
                ids = build_task(name).generate(tokenizer, length, seed, sample).input_ids
                yield f"{name}@{length}#{sample}", torch.tensor([ids])


def _head_scores(
    mass: torch.Tensor, selection_mask: torch.Tensor, layout: BlockLayout, last_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hq,) recall of the true mass (the last query tile weighted by ``last_weight``) and
    measured density of a selection, batch-averaged."""
    recall = (mass * selection_mask).sum((-1, -2)) / mass.sum((-1, -2)).clamp_min(1e-12)
    if last_weight:
        last, kept = mass[..., -1, :], selection_mask[..., -1, :]
        last_recall = (last * kept).sum(-1) / last.sum(-1).clamp_min(1e-12)
        recall = (1.0 - last_weight) * recall + last_weight * last_recall
    computed, visible = layout.density(BlockSelection(selection_mask, layout.block_size))
    return recall.mean(0), (computed / visible).float().mean(0)


def _score_layer(
    kind: str, q, k, ctx, block_size: int, stride: int, last_weight: float = 0.0
) -> torch.Tensor:
    """(n_candidates, 2, Hq): recall and density of every candidate on one layer's call."""
    layout = BlockLayout(ctx, block_size)
    mass = true_tile_mass(q, k, ctx, layout)
    rows = []
    if kind == "minference":
        for choice in MINFERENCE_CHOICES:
            method = build_method(choice["pattern"], block_size=block_size, **choice["knobs"])
            mask = method.select(q, k, ctx, layout).mask
            rows.append(_head_scores(mass, mask, layout, last_weight))
    else:
        scores = antidiagonal_tile_scores(q, k, ctx, layout, stride)
        for threshold in XATTENTION_THRESHOLDS:
            mask = keep_cumulative_mass(scores, threshold)
            mask[..., 0] = True
            rows.append(_head_scores(mass, layout.finalize(mask).mask, layout, last_weight))
    return torch.stack([torch.stack(r) for r in rows])


def _choose(kind: str, table: torch.Tensor) -> tuple[dict, dict]:
    """Per-level head tables and per-layer summaries from (layers, candidates, 2, Hq) scores."""
    recall, density = table[:, :, 0], table[:, :, 1]  # (layers, C, Hq)
    n_layers, _, n_heads = recall.shape
    heads: dict[float, list[list[Any]]] = {}
    summary: dict[float, dict[str, list[float]]] = {}
    levels = MINFERENCE_BUDGETS if kind == "minference" else XATTENTION_TARGETS
    for level in levels:
        if kind == "minference":
            fits = density <= level + 1e-9
            # best recall among fitting candidates (ties: the sparser); none fits: the sparsest
            ranked = torch.where(fits, recall - 1e-6 * density, -1.0 - density)
            pick = ranked.argmax(1)  # (layers, Hq)
            values = pick.tolist()
        else:
            reaches = recall >= level - 1e-9  # thresholds ascend: first reaching one is smallest
            pick = torch.where(reaches.any(1), reaches.float().argmax(1), reaches.shape[1] - 1)
            values = [[XATTENTION_THRESHOLDS[i] for i in row] for row in pick.tolist()]
        picked = pick[:, None, :]
        heads[level] = values
        summary[level] = {
            "recall": [round(float(v), 4) for v in recall.gather(1, picked)[:, 0].mean(-1)],
            "density": [round(float(v), 4) for v in density.gather(1, picked)[:, 0].mean(-1)],
        }
    assert all(len(t) == n_layers and len(t[0]) == n_heads for t in heads.values())
    return heads, summary


@torch.inference_mode()
def calibrate(
    model,
    tokenizer,
    *,
    kind: str,
    model_id: str,
    lengths: list[int],
    seed: int = 0,
    samples: int = 1,
    block_size: int = 128,
    stride: int = 8,
    last_weight: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Calibrate a profile; returns the keyword arguments of ``save_profile``.

    Args:
        kind: "minference", "xattention" or "channels".
        model_id: The name the model was loaded by (recorded in the profile).
        lengths: Calibration input lengths in tokens.
        samples: Inputs per (length, task).
        block_size: Tile size the recall and density are measured at (not channels).
        stride: XAttention's antidiagonal stride (xattention only).
        last_weight: Weight in [0, 1] of the last query tile's recall in the objective
            (minference and xattention; 0 = every query counts the same).
        progress: Called with a label before each input.
    """
    if kind not in CALIBRATED_KINDS:
        raise UsageError(f"kind={kind!r}; allowed: {list(CALIBRATED_KINDS)}")
    if not 0.0 <= last_weight <= 1.0:
        raise UsageError(f"last_weight={last_weight} is outside the allowed range [0, 1]")
    if last_weight and kind == "channels":
        raise UsageError("last_weight applies to minference and xattention profiles, not channels")
    if kind == "channels":
        importance = mean_importance(
            model, calibration_inputs(tokenizer, lengths, seed, samples), progress
        )
        calibration = {
            "lengths": list(lengths),
            "seed": seed,
            "samples": samples,
            "tasks": list(CALIBRATION_TASKS),
        }
        return channel_profile(
            importance, model_id=model_id, config=model.config, calibration=calibration
        )
    device = next(model.parameters()).device
    n_layers = fingerprint(model.config)["num_hidden_layers"]
    total: torch.Tensor | None = None
    count = 0
    sliding: set[int] = set()
    for label, ids in calibration_inputs(tokenizer, lengths, seed, samples):
        if progress is not None:
            progress(label)
        captured = capture_qk(model, ids.to(device), tuple(range(n_layers)))
        per_layer = []
        for layer in range(n_layers):
            q, k, ctx = captured.pop(layer)
            if ctx.sliding_window is not None:
                sliding.add(layer)
            scores = _score_layer(kind, q, k, ctx, block_size, stride, last_weight)
            per_layer.append(scores.cpu())
        scores = torch.stack(per_layer)  # (layers, C, 2, Hq)
        total = scores if total is None else total + scores
        count += 1
    heads, summary = _choose(kind, total / count)
    calibration = {
        "lengths": list(lengths),
        "seed": seed,
        "samples": samples,
        "tasks": list(CALIBRATION_TASKS),
        "block_size": block_size,
        "last_weight": last_weight,
        "sliding_layers": sorted(sliding),  # minference leaves these layers' own window as is
    }
    if kind == "xattention":
        calibration["stride"] = stride
    return {
        "kind": kind,
        "model": {"id": model_id, **fingerprint(model.config)},
        "calibration": calibration,
        "heads": heads,
        "summary": summary,
        "choices": list(MINFERENCE_CHOICES) if kind == "minference" else None,
    }


def write_profile(path: str, profile: dict[str, Any]) -> None:
    """Save a ``calibrate`` result."""
    save_profile(path, **profile)

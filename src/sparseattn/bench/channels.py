"""Channel calibration for ``double_sparsity`` (``sparseattn profile --kind channels``).

Queries and keys of every layer are captured from dense forward passes over the calibration
inputs, after RoPE and any q/k norm, as attention sees them. A channel d of a KV head matters
to the extent that its terms q_d k_d move the scores q.k: its importance is the mean of
|q_d k_d| over every (query, visible key) pair of an input and over the query heads of the
group, averaged over the inputs. Each KV head's channels are stored ranked, most important
first, so a method takes any number r of them as a prefix. The summary holds, for a few r, the
share of the importance the first r channels hold, per layer (mean over its KV heads) and per
KV head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..profiles import fingerprint
from ..types import AttentionContext
from .recall import capture_qk

SUMMARY_CHANNELS = (4, 8, 16, 32, 64)  # r values whose importance share the summary reports


def channel_importance(q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """(Hkv, D) mean of |q_d k_d| over the causal (query, key) pairs of one prompt pass.

    Keys outside the layer's own sliding window are not seen and not counted. The sum over
    pairs factorizes per query: sum_s |q_td| |k_sd| = |q_td| * (running sum of |k_d| over the
    keys query t sees), so no (L, L) matrix is formed.

    Args:
        q: (B, Hq, L, D) queries of a pass from position 0 (no padding).
        k: (B, Hkv, L, D) keys of the same pass.
        ctx: The call's context (for the layer's sliding window).
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    running = k.float().abs().cumsum(2)  # (B, Hkv, L, D): sum of |k| over keys 0..t
    seen = torch.arange(1, L + 1, dtype=torch.float64)  # keys query t sees
    window = ctx.sliding_window
    if window is not None and window < L:  # query t sees keys t - window < s <= t
        running = running - torch.nn.functional.pad(running, (0, 0, window, 0))[:, :, :L]
        seen = seen.clamp(max=window)
    queries = q.float().abs().view(B, Hkv, Hq // Hkv, L, D)  # (B, Hkv, g, L, D)
    sums = (queries * running[:, :, None]).sum((0, 2, 3), dtype=torch.float64)  # (Hkv, D)
    return (sums / (B * (Hq // Hkv) * seen.sum())).float()


@torch.inference_mode()
def mean_importance(
    model,
    inputs: Iterable[tuple[str, torch.Tensor]],
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """(layers, Hkv, D) channel importance of every layer, averaged over ``inputs``.

    Args:
        inputs: (label, (1, L) ids) pairs.
        progress: Called with a label before each input.
    """
    device = next(model.parameters()).device
    n_layers = fingerprint(model.config)["num_hidden_layers"]
    total: torch.Tensor | None = None
    count = 0
    for label, ids in inputs:
        if progress is not None:
            progress(label)
        captured = capture_qk(model, ids.to(device), tuple(range(n_layers)))
        layers = [channel_importance(*captured.pop(i)).cpu() for i in range(n_layers)]
        importance = torch.stack(layers)  # (layers, Hkv, D)
        total = importance if total is None else total + importance
        count += 1
    if total is None:
        raise ValueError("mean_importance needs at least one input")
    return total / count


def channel_profile(
    importance: torch.Tensor, *, model_id: str, config: Any, calibration: dict[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of ``save_profile`` for a channels profile.

    Args:
        importance: (layers, Hkv, D) from ``mean_importance``.
        model_id: The name the model was loaded by.
        config: The model's config (its fingerprint is recorded).
        calibration: How it was made (lengths, seed, samples, tasks).
    """
    ranking = importance.argsort(dim=-1, descending=True, stable=True)  # (layers, Hkv, D)
    ranked = importance.gather(-1, ranking)
    share = ranked.cumsum(-1) / ranked.sum(-1, keepdim=True).clamp_min(1e-30)  # (layers, Hkv, D)
    D = importance.shape[-1]
    summary = {
        float(r): {
            "share": [round(float(v), 4) for v in share[:, :, r - 1].mean(-1)],
            "head_share": [[round(float(v), 4) for v in row] for row in share[:, :, r - 1]],
        }
        for r in SUMMARY_CHANNELS
        if r <= D
    }
    return {
        "kind": "channels",
        "model": {"id": model_id, **fingerprint(config)},
        "calibration": {**calibration, "importance": "mean |q_d k_d| over causal pairs"},
        "heads": {0.0: ranking.tolist()},
        "summary": summary,
        "choices": None,
    }

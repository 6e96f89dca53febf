"""Activations calibration (``sparseattn profile --kind activations``): thresholds per layer and
linear layer for CATS / TEAL / R-Sparse, and R-Sparse's per-layer budget split.

Dense forward passes over the calibration inputs (the project's generated texts) capture the
input of every nn.Linear of every decoder layer, and CATS's |act(gate_proj(x))|, at a random
sample of token positions per input (the first ``SKIP_FIRST`` positions, where attention sinks
put outliers that decode never sees, are left out). Per (layer, site), the thresholds at levels
0, 0.025, ..., 0.95 are the quantiles of |x| over the sampled rows' entries.

R-Sparse's split, per (layer, linear) and per sparsity in ``RSPARSE_LEVELS``: among the shares
of the weight budget on exact channels in ``rsparse.SHARES``, the one whose output error
||(W - W_r) x_rest||^2 (channels below the share's threshold through the top-r singular
directions; ``rsparse.residual_error``) summed over the sampled rows is least. A per-layer
greedy choice, not the paper's evolutionary search on the model's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..activation.profile import ACT_SITE, SKIP_FIRST, model_facts
from ..activation.rsparse import SHARES, residual_error, split_budget, svd_of
from ..activation.sites import decoder_layers, gated_mlp, linear_sites

LEVELS = tuple(round(0.025 * i, 3) for i in range(39))  # 0 ... 0.95
RSPARSE_LEVELS = (0.25, 0.4, 0.5, 0.6, 0.7)
SUMMARY_LEVELS = (0.25, 0.4, 0.5)


@torch.inference_mode()
def capture_inputs(
    model: nn.Module,
    inputs: Iterable[tuple[str, torch.Tensor]],
    tokens_per_input: int = 256,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, site): (N, width) float32 rows} of every linear input and CATS's act site.

    Args:
        inputs: (label, (1, L) ids) pairs.
        tokens_per_input: Positions sampled per input (all after ``SKIP_FIRST`` if fewer).
        seed: Seed of the sampled positions.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rows: dict[tuple[int, str], list[torch.Tensor]] = {}
    picked: list[torch.Tensor] = []  # the current input's positions

    def hook_for(key: tuple[int, str]):
        def capture(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # (L, width), batch 1
            rows.setdefault(key, []).append(x.index_select(0, picked[0]).float().cpu())

        return capture

    handles = []
    for index, layer in enumerate(layers):
        for site, linear in linear_sites(layer).items():
            handles.append(linear.register_forward_pre_hook(hook_for((index, site))))
    try:
        for label, ids in inputs:
            if progress is not None:
                progress(label)
            length = ids.shape[-1]
            usable = torch.arange(min(SKIP_FIRST, length - 1), length)
            order = torch.randperm(usable.numel(), generator=generator)[:tokens_per_input]
            picked[:] = [usable[order.sort().values].to(device)]
            model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    captured = {key: torch.cat(parts) for key, parts in rows.items()}
    for index, layer in enumerate(layers):
        try:
            mlp = gated_mlp(layer, index)
        except ValueError:
            continue  # no gated MLP: no CATS site
        x = captured[(index, "mlp.gate_proj")].to(device, mlp.gate_proj.weight.dtype)
        captured[(index, ACT_SITE)] = mlp.act_fn(mlp.gate_proj(x)).float().cpu()
    return captured


def quantile_rows(values: torch.Tensor, levels: tuple[float, ...]) -> list[float]:
    """The ``levels`` quantiles of |values| (0 at level 0): dropping |x| below the level's
    value drops that share of the entries."""
    flat = values.abs().flatten().sort().values
    n = flat.numel()
    return [0.0 if q <= 0 else float(flat[min(n - 1, int(q * n))]) for q in levels]


def choose_shares(
    rows: torch.Tensor, weight: torch.Tensor, table: list[float], levels: tuple[float, ...]
) -> list[float]:
    """R-Sparse's share of the budget on exact channels at each of ``RSPARSE_LEVELS``.

    Args:
        rows: (N, in) sampled inputs of the layer.
        weight: (out, in).
        table: The site's thresholds at ``levels``.
    """
    d_out, d_in = weight.shape
    _, s, vh = svd_of(weight)
    chosen = []
    for sparsity in RSPARSE_LEVELS:
        errors = []
        for share in SHARES:
            kept, rank = split_budget(d_in, d_out, sparsity, share)
            threshold = _interpolate(table, levels, 1.0 - kept)
            errors.append(residual_error(rows, threshold, s, vh.to(rows.dtype), rank))
        chosen.append(SHARES[min(range(len(SHARES)), key=errors.__getitem__)])
    return chosen


def _interpolate(table: list[float], levels: tuple[float, ...], sparsity: float) -> float:
    if sparsity <= 0:
        return 0.0
    for (l0, t0), (l1, t1) in zip(zip(levels, table), zip(levels[1:], table[1:])):
        if sparsity <= l1:
            return t0 + (sparsity - l0) / (l1 - l0) * (t1 - t0)
    return table[-1]


def _greedy_note() -> str:
    from .teal_greedy import STEP, TOKENS

    return (
        f"per layer: steps of {STEP:g} on one input group at a time, the least increase of the "
        f"layer's squared output error per weight saved, first {TOKENS} tokens of each input"
    )


def _linear_mean(table: list[list[float]], sites: list[str]) -> float:
    """Mean of a per-layer x per-site table over the linear sites (CATS's act site left out)."""
    columns = [k for k, site in enumerate(sites) if site != ACT_SITE]
    values = [row[k] for row in table for k in columns]
    return round(sum(values) / len(values), 3)


def activation_profile(
    model: nn.Module,
    inputs: Iterable[tuple[str, torch.Tensor]],
    *,
    model_id: str,
    calibration: dict[str, Any],
    tokens_per_input: int = 256,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    teal_greedy: bool = True,
) -> dict[str, Any]:
    """The keyword arguments of ``save_activation_profile`` for ``model`` on ``inputs`` (with
    TEAL's greedy allocation unless ``teal_greedy`` is False)."""
    inputs = list(inputs)  # read twice: the thresholds, then the greedy allocation
    captured = capture_inputs(model, inputs, tokens_per_input, seed, progress)
    layers = decoder_layers(model)
    sites = list(linear_sites(layers[0]))
    if (0, ACT_SITE) in captured:
        sites.append(ACT_SITE)
    per_layer = [
        {site: quantile_rows(captured[(i, site)], LEVELS) for site in sites}
        for i in range(len(layers))
    ]
    thresholds = {
        level: [[round(per_layer[i][site][k], 6) for site in sites] for i in range(len(layers))]
        for k, level in enumerate(LEVELS)
    }
    rsparse: dict[float, list[list[float]]] = {lv: [] for lv in RSPARSE_LEVELS}
    for i, layer in enumerate(layers):
        linears = linear_sites(layer)
        shares = {
            site: choose_shares(
                captured[(i, site)], linears[site].weight, per_layer[i][site], LEVELS
            )
            if site in linears
            else [1.0] * len(RSPARSE_LEVELS)
            for site in sites
        }
        for k, level in enumerate(RSPARSE_LEVELS):
            rsparse[level].append([shares[site][k] for site in sites])
        if progress is not None:
            progress(f"rsparse search, layer {i}")
    greedy = None
    if teal_greedy:
        from .teal_greedy import greedy_allocation

        greedy = greedy_allocation(
            model,
            inputs,
            lambda i, site, level: _interpolate(per_layer[i][site], LEVELS, level),
            sites,
            progress,
        )
    rows = next(iter(captured.values())).shape[0]
    summary = {
        f"{level:g}": {
            "threshold_mean": {
                site: round(
                    sum(per_layer[i][site][LEVELS.index(level)] for i in range(len(layers)))
                    / len(layers),
                    5,
                )
                for site in sites
            },
            "rsparse_share_mean": _linear_mean(rsparse[level], sites) if level in rsparse else None,
        }
        for level in SUMMARY_LEVELS
    }
    return {
        "model": {"id": model_id, **model_facts(model.config)},
        "calibration": {
            **calibration,
            "tokens_per_input": tokens_per_input,
            "rows": rows,
            "skip_first": SKIP_FIRST,
            "sample_seed": seed,
            "thresholds": "quantile of |x| over the sampled rows' entries, dense model",
            "rsparse": "per-layer least ||(W - W_r) x_rest||^2 over shares "
            + ",".join(f"{s:g}" for s in SHARES),
            **({"teal_greedy": _greedy_note()} if teal_greedy else {}),
        },
        "sites": sites,
        "thresholds": thresholds,
        "rsparse": rsparse,
        "summary": summary,
        "teal_greedy": greedy,
    }

"""TEAL's greedy allocation of a block's sparsity over its linear layers (``teal[allocation=greedy]``).

TEAL (arXiv:2408.14690) gives every decoder block the same sparsity but splits it unevenly over
the block's linear layers: starting from none, it repeatedly raises the sparsity of the one
layer whose step costs the least error at the block's output, until the block reaches the
target. Here, per decoder layer:

- the layer's linear sites are grouped by the input they share (q, k and v read one tensor,
  so do gate and up): one threshold per group, as at decode;
- a step raises one group's sparsity by ``STEP`` (of that group's channels; thresholds from
  the profile's calibrated quantiles); its cost is the increase of the squared error of the
  layer's output, against the dense layer on the same inputs, per weight byte the step saves;
  the cheapest step is taken;
- the block's sparsity is the parameter-weighted mean of its groups'; the allocation at each
  of ``TARGETS`` is interpolated between the two greedy states around it.

The layer runs on its own dense inputs (captured once; errors do not compound across layers),
over the first ``TOKENS`` tokens of each calibration input, the first ``SKIP_FIRST`` left out
of the error. Steps of ``STEP`` are coarser than the paper's: a cost of search time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..activation.profile import SKIP_FIRST  # positions left out of the error, as of the thresholds
from ..activation.sites import decoder_layers, linear_sites

TARGETS = (0.25, 0.4, 0.5, 0.6)  # block sparsities the allocation is stored at
STEP = 0.1  # sparsity one greedy step adds to one group
TOKENS = 256  # tokens of each calibration input the layer outputs are compared on


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.inference_mode()
def capture_layer_inputs(
    model: nn.Module, inputs: Iterable[tuple[str, torch.Tensor]], tokens: int = TOKENS
) -> tuple[list[list[tuple[tuple, dict]]], dict[int, list[list[str]]]]:
    """The (args, kwargs) each decoder layer is called with, per input (its first ``tokens``
    tokens, dense model), and per layer its linear sites grouped by the input they share."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    fed: dict[tuple[int, str], torch.Tensor] = {}  # held, so no two inputs share an address

    def on_layer(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[index].append((args, dict(kwargs)))

        return hook

    def on_linear(index: int, site: str):
        def hook(module: nn.Module, args: tuple) -> None:
            fed[(index, site)] = args[0]

        return hook

    handles = [
        layer.register_forward_pre_hook(on_layer(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    for i, layer in enumerate(layers):
        for site, linear in linear_sites(layer).items():
            handles.append(linear.register_forward_pre_hook(on_linear(i, site)))
    try:
        for _, ids in inputs:
            model(input_ids=ids[:, :tokens].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[list[str]]] = {}
    for i, layer in enumerate(layers):
        by_input: list[tuple[torch.Tensor, list[str]]] = []
        for site in linear_sites(layer):
            x = fed[(i, site)]
            match = next((names for seen, names in by_input if seen is x), None)
            if match is None:
                by_input.append((x, [site]))
            else:
                match.append(site)
        groups[i] = [names for _, names in by_input]
    fed.clear()
    return calls, groups


@torch.inference_mode()
def greedy_layer(
    layer: nn.Module,
    calls: list[tuple[tuple, dict]],
    groups: list[list[str]],
    threshold: Callable[[str, float], float],
    targets: tuple[float, ...] = TARGETS,
    step: float = STEP,
) -> dict[float, dict[str, float]]:
    """{target block sparsity: {site: sparsity}} for one decoder layer.

    Args:
        calls: The layer's captured (args, kwargs), one per calibration input.
        groups: Its linear sites grouped by shared input.
        threshold: (site, sparsity) -> the |x| threshold dropping that share of channels.
    """
    linears = linear_sites(layer)
    sizes = [sum(linears[s].weight.numel() for s in group) for group in groups]
    total = float(sum(sizes))
    dense = [_output(layer(*args, **kwargs)) for args, kwargs in calls]
    cut: dict[str, float] = {}  # site: current threshold

    def masking(site: str):
        def hook(module: nn.Module, args: tuple) -> tuple:
            t = cut.get(site, 0.0)
            x = args[0]
            return (x if t <= 0.0 else torch.where(x.abs() >= t, x, 0.0),)

        return hook

    def error(levels: list[float]) -> float:
        for group, level in zip(groups, levels):
            for site in group:
                cut[site] = threshold(site, level)
        err = 0.0
        for (args, kwargs), ref in zip(calls, dense):
            out = _output(layer(*args, **kwargs))
            err += float((out - ref)[:, SKIP_FIRST:].float().square().sum())
        return err

    handles = [linears[s].register_forward_pre_hook(masking(s)) for s in linears]
    try:
        levels = [0.0] * len(groups)
        current = 0.0
        path = [(0.0, list(levels))]
        while path[-1][0] < max(targets) - 1e-9:
            best = None
            for g in range(len(groups)):
                if levels[g] + step > 0.95 + 1e-9:
                    continue
                trial = list(levels)
                trial[g] = round(levels[g] + step, 6)
                err = error(trial)
                cost = (err - current) / (sizes[g] * step)
                if best is None or cost < best[0]:
                    best = (cost, trial, err)
            if best is None:
                break
            _, levels, current = best
            block = sum(s * lv for s, lv in zip(sizes, levels)) / total
            path.append((block, list(levels)))
    finally:
        for handle in handles:
            handle.remove()
    allocation: dict[float, dict[str, float]] = {}
    for target in targets:
        lower, upper = path[0], path[-1]
        for a, b in itertools.pairwise(path):
            if a[0] < target <= b[0]:
                lower, upper = a, b
                break
        span = upper[0] - lower[0]
        share = 0.0 if span <= 0 else min(1.0, (target - lower[0]) / span)
        allocation[target] = {
            site: round(lo + share * (hi - lo), 4)
            for group, lo, hi in zip(groups, lower[1], upper[1])
            for site in group
        }
    return allocation


@torch.inference_mode()
def greedy_allocation(
    model: nn.Module,
    inputs: Iterable[tuple[str, torch.Tensor]],
    threshold: Callable[[int, str, float], float],
    sites: list[str],
    progress: Callable[[str], None] | None = None,
) -> dict[float, list[list[float]]]:
    """{target: per layer, per site (in ``sites`` order; 0 for a site that is not a linear
    layer, e.g. CATS's act site) the sparsity TEAL's greedy search gives it}.

    Args:
        threshold: (layer, site, sparsity) -> |x| threshold, from the calibrated tables.
    """
    calls, groups = capture_layer_inputs(model, inputs)
    table: dict[float, list[list[float]]] = {t: [] for t in TARGETS}
    for i, layer in enumerate(decoder_layers(model)):
        found = greedy_layer(layer, calls[i], groups[i], lambda s, lv, i=i: threshold(i, s, lv))
        for target in TARGETS:
            table[target].append([found[target].get(site, 0.0) for site in sites])
        if progress is not None:
            progress(f"teal greedy allocation, layer {i}")
    return table

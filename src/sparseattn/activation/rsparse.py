"""R-Sparse: sparse input channels plus a low-rank part for the rest, per linear layer."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .base import ActivationMethod, register_activation
from .modules import DecodeSwitch, SparseLinear
from .sites import check_plain, linear_sites, parent_of
from .stats import ActivationStats

# the shares of a layer's weight budget on exact channels the calibration chooses among
SHARES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)

_SVD: dict[int, tuple[weakref.ref, int, tuple]] = {}  # id(weight): (ref, version, factors)


def split_budget(d_in: int, d_out: int, sparsity: float, share: float) -> tuple[float, int]:
    """(kept channel fraction, rank) of a layer W (d_out, d_in) at ``sparsity``.

    The layer may read (1 - sparsity) of its weights: ``share`` of that on exact input
    channels (each d_out values), the rest on a rank-r factor pair (r (d_in + d_out) values).
    """
    budget = 1.0 - sparsity
    kept = share * budget
    rank = math.floor((1.0 - share) * budget * d_in * d_out / (d_in + d_out))
    return kept, min(rank, d_in, d_out)


def svd_of(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, m), S (m,), Vh (m, in)) of a weight in float32, cached while it is unchanged."""
    cached = _SVD.get(id(weight))
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    factors = tuple(torch.linalg.svd(weight.detach().float(), full_matrices=False))
    key = id(weight)
    _SVD[key] = (weakref.ref(weight, lambda _: _SVD.pop(key, None)), weight._version, factors)
    return factors


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(V_r (in, r), (U_r S_r)^T (r, out)) in the weight's dtype, or None for rank 0."""
    if rank == 0:
        return None
    u, s, vh = svd_of(weight)
    down = vh[:rank].T.contiguous().to(weight.dtype)  # (in, r)
    up = (u[:, :rank] * s[:rank]).T.contiguous().to(weight.dtype)  # (r, out)
    return down, up


def residual_error(
    rows: torch.Tensor, threshold: float, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> float:
    """Squared output error of a layer on ``rows`` (N, in) when channels with |x| >= threshold
    are exact and the rest go through the top ``rank`` singular directions:
    || (W - W_r) x_rest ||^2 = sum over i >= rank of s_i^2 (v_i . x_rest)^2."""
    rest = torch.where(rows.abs() >= threshold, 0.0, rows)  # (N, in)
    proj = rest @ vh[rank:].T  # (N, m - rank)
    return float((proj.square() * s[rank:].square()).sum())


@register_activation
@dataclass
class RSparse(ActivationMethod):
    """R-Sparse: exact large-magnitude input channels plus a low-rank (top singular) part for the rest.

    Zhang et al., "R-Sparse: Rank-Aware Activation Sparsity for Efficient LLM Inference",
    ICLR 2025, arXiv:2504.19449. For every linear layer y = W x: the input channels with
    |x| >= t go through their columns of W exactly, the others through W's top r singular
    directions, y = W x_kept + U_r S_r V_r^T x_rest (the non-sparse part behaves like a few
    bias terms, so a low rank captures it). A layer reads (1 - sparsity) of its weights:
    a share of that on exact channels, the rest on the rank-r factors (``split_budget``).
    The share is searched per layer and linear (``bench/activations.py``): among ``SHARES``
    it takes the one with the least output error ||(W - W_r) x_rest||^2 on the calibration
    tokens at a few sparsities (the stored levels; in between it is interpolated, and it is 1,
    exact, at sparsity 0). This is a per-layer greedy search: the paper searches the
    per-layer recipe with an evolutionary algorithm on the model's loss, which is not done
    here. The threshold t is the calibrated quantile that keeps the share's fraction of
    channels; the SVD is taken when the hook is entered (cached while the weight is
    unchanged). Decode only: prefill is the original model.
    """

    name = "rsparse"
    paper = "Zhang et al. 2025, R-Sparse (arXiv:2504.19449)"

    def wrap_layer(
        self, layer_idx: int, layer: nn.Module, switch: DecodeSwitch, stats: ActivationStats
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        profile = self.bound_profile
        swaps = []
        for site, linear in linear_sites(layer).items():
            check_plain(linear, f"layer {layer_idx} {site}")
            d_out, d_in = linear.weight.shape
            share = profile.sparse_share(layer_idx, site, self.sparsity)
            kept, rank = split_budget(d_in, d_out, self.sparsity, share)
            threshold = profile.threshold(layer_idx, site, 1.0 - kept)
            factors = low_rank_factors(linear.weight, rank)
            size = linear.weight.element_size()
            counter = stats.site(layer_idx, site, d_out * size, rank * (d_in + d_out) * size)
            parent, attribute = parent_of(layer, site)
            stand_in = SparseLinear(linear, threshold, counter, switch, factors)
            swaps.append((parent, attribute, stand_in))
        return swaps

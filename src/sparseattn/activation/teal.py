"""TEAL: magnitude thresholding of the input of every linear layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..methods.base import knob
from .base import ActivationMethod, register_activation
from .modules import DecodeSwitch, SparseLinear
from .sites import check_plain, linear_sites, parent_of
from .stats import ActivationStats


@register_activation
@dataclass
class Teal(ActivationMethod):
    """TEAL: drop the input channels of every linear layer whose |x| is below a calibrated threshold.

    Liu et al., "Training-Free Activation Sparsity in Large Language Models", arXiv:2408.14690.
    The hidden states entering q/k/v, o, gate/up and down are zero-mean and unimodal, so a
    magnitude quantile per tensor reaches a target sparsity; a linear layer then reads only
    the weight columns of the kept channels. Choices here: every nn.Linear of every decoder
    layer is one site with its own threshold (q, k and v share their input and so their
    threshold, likewise gate and up), each the quantile of |input| over the dense model's
    calibration tokens at the target sparsity (``sparseattn profile --kind activations``).
    ``allocation='uniform'``: the same sparsity at every site; ``'greedy'``: every block at
    ``sparsity``, split over its linear layers by the paper's greedy search (the cheapest
    step in block-output error per weight byte saved, ``bench/teal_greedy.py``), read from
    the profile. A batch of rows reads the union of the channels its rows keep. Decode only:
    prefill is the original model.
    """

    name = "teal"
    paper = "Liu et al. 2024, TEAL (arXiv:2408.14690)"

    allocation: str = knob(
        "uniform",
        choices=("uniform", "greedy"),
        help="'uniform': every linear layer at `sparsity`; 'greedy': each block at `sparsity`, "
        "split over its linear layers by TEAL's greedy search (stored in the profile)",
    )

    @property
    def label(self) -> str:
        extra = "" if self.allocation == "uniform" else f",allocation={self.allocation}"
        return f"{self.name}[sparsity={self.sparsity:g}{extra}]"

    def bind(self, model: nn.Module):
        profile = super().bind(model)
        if self.allocation == "greedy":
            profile.greedy_sparsity(0, profile.sites[0], self.sparsity)  # refuses early
        return profile

    def wrap_layer(
        self, layer_idx: int, layer: nn.Module, switch: DecodeSwitch, stats: ActivationStats
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        swaps = []
        for site, linear in linear_sites(layer).items():
            check_plain(linear, f"layer {layer_idx} {site}")
            profile = self.bound_profile
            level = self.sparsity
            if self.allocation == "greedy":
                level = profile.greedy_sparsity(layer_idx, site, self.sparsity)
            threshold = profile.threshold(layer_idx, site, level)
            counter = stats.site(
                layer_idx, site, linear.out_features * linear.weight.element_size()
            )
            parent, attribute = parent_of(layer, site)
            swaps.append((parent, attribute, SparseLinear(linear, threshold, counter, switch)))
        return swaps

"""TEAL: magnitude thresholding of the input of every linear layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    The same sparsity is used at every site: the paper's greedy allocation of a model-level
    sparsity over layers is not implemented (this is its uniform variant). A batch of rows
    reads the union of the channels its rows keep. Decode only: prefill is the original
    model.
    """

    name = "teal"
    paper = "Liu et al. 2024, TEAL (arXiv:2408.14690)"

    def wrap_layer(
        self, layer_idx: int, layer: nn.Module, switch: DecodeSwitch, stats: ActivationStats
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        swaps = []
        for site, linear in linear_sites(layer).items():
            check_plain(linear, f"layer {layer_idx} {site}")
            threshold = self.bound_profile.threshold(layer_idx, site, self.sparsity)
            counter = stats.site(
                layer_idx, site, linear.out_features * linear.weight.element_size()
            )
            parent, attribute = parent_of(layer, site)
            swaps.append((parent, attribute, SparseLinear(linear, threshold, counter, switch)))
        return swaps

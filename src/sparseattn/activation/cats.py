"""CATS: contextually-aware thresholding of the gated MLP's activations."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import ActivationMethod, register_activation
from .modules import CatsMLP, DecodeSwitch
from .profile import ACT_SITE
from .sites import check_plain, gated_mlp
from .stats import ActivationStats


@register_activation
@dataclass
class Cats(ActivationMethod):
    """CATS: zero the gated MLP's channels where |act(gate_proj x)| is below a per-layer threshold.

    Lee et al., "CATS: Contextually-Aware Thresholding for Sparsity in Large Language Models",
    arXiv:2404.08763. The MLP is down(act(gate x) * up x); per layer, the threshold is the
    quantile of |act(gate x)| over calibration tokens that reaches the target sparsity (the
    paper's "cutoff" from the activation histogram). At decode gate_proj runs dense, the kept
    channels' rows of up_proj and columns of down_proj are the only MLP weights read after it.
    Choices the paper leaves open: thresholds come from the dense model's activations on the
    project's generated calibration texts (``sparseattn profile --kind activations``), the
    same target sparsity for every layer, and a batch of rows reads the union of the channels
    its rows keep (each row still multiplies only its own kept channels). Attention and the
    gate projection stay dense. Decode only: prefill is the original MLP.
    """

    name = "cats"
    paper = "Lee et al. 2024, CATS (arXiv:2404.08763)"

    def wrap_layer(
        self, layer_idx: int, layer: nn.Module, switch: DecodeSwitch, stats: ActivationStats
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        mlp = gated_mlp(layer, layer_idx)
        check_plain(mlp, f"layer {layer_idx} mlp")
        threshold = self.bound_profile.threshold(layer_idx, ACT_SITE, self.sparsity)
        up, down = mlp.up_proj, mlp.down_proj
        size = up.weight.element_size()
        up_counter = stats.site(layer_idx, "mlp.up_proj", up.in_features * size)
        down_counter = stats.site(layer_idx, "mlp.down_proj", down.out_features * size)
        stand_in = CatsMLP(mlp, threshold, up_counter, down_counter, switch)
        return [(layer, "mlp", stand_in)]

"""TidalDecode: two selection layers choose the tokens every other sparse layer reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import UsageError
from ...registry import register_method
from ..base import knob
from .crosslayer import CrossLayer


@register_method
@dataclass
class TidalDecode(CrossLayer):
    """TidalDecode (Yang et al., 2024, arXiv:2410.05076): position persistent sparse attention.

    Layers below ``full_layers`` attend densely; layer ``full_layers`` and the re-selection
    layer ``reselect_layer`` attend densely and choose the ``budget`` tokens with the most
    attention mass; every other layer reads the latest choice of the same decode step (see
    ``crosslayer``). Choices: the mass is each query head's exact softmax summed over all heads
    of the layer, so one choice per batch row serves every KV head (the reference code keeps a
    top-k per query head, paired with the same head index in later layers; heads of different
    layers are not matched, so one shared set is the choice here); the sink, the last
    ``window`` tokens and the current token are always read and count in the budget;
    ``reselect_layer`` defaults to the model's middle layer (``num_hidden_layers // 2``, resolved
    when bound to a model; the paper re-selects at layer 13 of 32 for Llama-3-8B), -1 for none.
    """

    name: ClassVar[str] = "tidaldecode"
    paper: ClassVar[str] = (
        "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention "
        "(arXiv:2410.05076)"
    )

    reselect_layer: int | None = knob(
        None, help="middle layer that chooses again (None: the model's middle; -1: none)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        layer = self.reselect_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise UsageError(
                f"tidaldecode: knob reselect_layer={layer!r} must be an integer, -1 (none) or "
                "None (the model's middle layer)"
            )
        if layer is not None and layer != -1 and layer <= self.full_layers:
            raise UsageError(
                f"tidaldecode: knob reselect_layer={layer} must come after the first selection "
                f"layer (full_layers={self.full_layers}); allowed: > {self.full_layers}, -1 "
                "(none) or None (the model's middle layer)"
            )
        self._reselect = None if layer in (None, -1) else layer

    def bind(self, config: Any) -> None:
        layers = self.model_layers(config)
        if self.reselect_layer is None:
            middle = layers // 2
            self._reselect = middle if middle > self.full_layers else None
        elif self.reselect_layer >= layers:
            raise UsageError(
                f"tidaldecode: knob reselect_layer={self.reselect_layer} is past the model's "
                f"last layer; allowed: {self.full_layers + 1}..{layers - 1}, -1 or None"
            )

    def selects(self, layer_idx: int) -> bool:
        return layer_idx == self.full_layers or layer_idx == self._reselect

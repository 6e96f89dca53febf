"""Re-rotating cached keys: RoPE is a rotation, so a key rotated at position p moves to p + d
by one more rotation of angle d * theta. StreamingLLM places cached tokens at positions inside
the cache; only the relative offsets matter, so moving the sink keys next to the oldest window
key at every step gives exactly that scheme at O(sink) cost per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError


@dataclass
class RopeRotation:
    """Rotates keys by a per-token position delta with a model's RoPE frequencies.

    Attributes:
        inv_freq: (D / 2,) float inverse frequencies of the layer's rotary embedding.
    """

    inv_freq: torch.Tensor

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` (B, H, S, D) by ``delta`` (B, S) positions (rotate-half layout)."""
        angles = delta[:, None, :, None].float() * self.inv_freq.to(keys.device)  # (B, 1, S, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, 1, S, D)
        half = keys.shape[-1] // 2
        rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
        out = keys.float() * angles.cos() + rotated_half.float() * angles.sin()
        return out.to(keys.dtype)


def rope_rotation(model: nn.Module, layer_type: str | None = None) -> RopeRotation:
    """The RoPE frequencies a model applies to the layers of ``layer_type``.

    Reads the rotary embedding module of the model (``inv_freq``, or ``<layer_type>_inv_freq``
    for models with one RoPE per layer type such as Gemma 3).

    Raises:
        ValueError: the model has no rotary embedding we can read (naming the model).
    """
    for name, module in model.named_modules():
        if not name.endswith("rotary_emb"):
            continue
        typed = getattr(module, f"{layer_type}_inv_freq", None) if layer_type else None
        inv_freq = typed if typed is not None else getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return RopeRotation(inv_freq.detach().float())
    raise UsageError(
        f"rerotate=True needs a rotary position embedding with `inv_freq`; "
        f"{type(model).__name__} has none (use rerotate=False)"
    )

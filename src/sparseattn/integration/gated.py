"""Gated attention for DuoAttention gate training: a second registered attention function.

Inside ``gated_attention(model, gates, sink=S, window=W)`` every config of the model names
``"sparseattn_gated"`` as its attention implementation, and each attention layer returns, per
query head,

    alpha x full causal attention + (1 - alpha) x streaming attention (sink S + last W tokens)

of the same q, k and v, with alpha = ``gates[layer, kv_head]`` shared by the query heads of the
KV head's group (DuoAttention, Xiao et al., arXiv:2410.10819, gates one alpha per KV head on
GQA models). The gates keep their autograd graph: a loss on the model's outputs back-propagates
into them. Leaving the block restores the previous implementation names; nothing else on the
model changes (no patched forwards).

Choices:
- Both branches run as SDPA (the CPU flash kernel when available, forward and backward); the
  streaming branch takes a boolean (L, L) mask, so memory stays O(L^2) bits per call, never an
  fp32 score matrix per head.
- Layers with their own sliding window (Gemma 3's local layers, Mistral) are not gated: they
  run their own causal window attention, unchanged, and are recorded in
  ``binding.sliding_layers``; their gates receive no gradient.
- Calls must be whole unpadded sequences from position 0 without a KV cache (training
  passes), and logit soft-capping is refused (SDPA has none): both raise UsageError.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..errors import UsageError
from .hf import attention_layers, model_configs, sparse_mask

IMPLEMENTATION = "sparseattn_gated"


@dataclass
class GateBinding:
    """What the gated attention function reads for one model.

    Attributes:
        gates: (layers, Hkv) gate values in [0, 1] (a tensor that may require grad).
        sink: First tokens every streaming query sees.
        window: Most recent tokens (the query's own included) a streaming query sees.
        sliding_layers: Layers that arrived with their own sliding window (filled by the calls).
    """

    gates: torch.Tensor
    sink: int
    window: int
    sliding_layers: set[int] = field(default_factory=set)


_BOUND: weakref.WeakKeyDictionary[nn.Module, GateBinding] = weakref.WeakKeyDictionary()


def streaming_mask(length: int, sink: int, window: int, device: Any = None) -> torch.Tensor:
    """(L, L) bool: query t sees key s when s <= t and (s < sink or t - s < window)."""
    pos = torch.arange(length, device=device)
    q, k = pos[:, None], pos[None, :]
    return (k <= q) & ((k < sink) | (q - k < window))


def window_mask(length: int, window: int, device: Any = None) -> torch.Tensor:
    """(L, L) bool: causal attention within the layer's own sliding window (t - s < window)."""
    pos = torch.arange(length, device=device)
    q, k = pos[:, None], pos[None, :]
    return (k <= q) & (q - k < window)


def mix_streaming(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    alpha: torch.Tensor,
    sink: int,
    window: int,
    scaling: float,
) -> torch.Tensor:
    """alpha x causal attention + (1 - alpha) x sink + window attention, per KV head.

    Args:
        query: (B, Hq, L, D).
        key: (B, Hkv, L, D).
        value: (B, Hkv, L, D).
        alpha: (Hkv,) gates.
        sink: Sink tokens of the streaming branch.
        window: Recent tokens of the streaming branch.
        scaling: Softmax scale.

    Returns:
        (B, Hq, L, D).
    """
    _, Hq, L, _ = query.shape  # (B, Hq, L, D)
    gqa = Hq != key.shape[1]
    full = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa
    )  # (B, Hq, L, D)
    if L <= sink + window:  # every query sees all its keys: streaming equals full
        return full
    mask = streaming_mask(L, sink, window, query.device)
    stream = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa
    )  # (B, Hq, L, D)
    a = alpha.to(query.dtype).repeat_interleave(Hq // key.shape[1])[None, :, None, None]
    return stream + a * (full - stream)  # (B, Hq, L, D)


def gated_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' AttentionInterface (see the module docstring).

    Args:
        module: The attention layer (provides ``layer_idx``).
        query: (B, Hq, L, D).
        key: (B, Hkv, L, D).
        value: (B, Hkv, L, D).
        attention_mask: The VisibilityInfo of ``sparse_mask``.

    Returns:
        (B, L, Hq, D) and no attention weights.
    """
    binding = _BOUND.get(module)
    if binding is None:
        raise RuntimeError(
            f"{type(module).__name__} called the gated attention outside `gated_attention(...)`"
        )
    L = query.shape[2]
    info = attention_mask
    if info is None or isinstance(info, torch.Tensor):
        raise UsageError("gated attention needs a 2-D padding mask or none, not a 4-D mask")
    if info.q_offset != 0 or key.shape[2] != L or not info.padding_absent(allow_sync=True):
        raise UsageError(
            "gated attention trains on whole unpadded sequences from position 0 without a KV "
            f"cache; got {L} queries at offset {info.q_offset} over {key.shape[2]} keys"
        )
    if softcap is not None:
        raise UsageError(f"gated attention has no logit soft-capping; this model uses {softcap}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = sliding_window or info.local_size
    if window is not None:  # the layer's own window: not gated
        binding.sliding_layers.add(module.layer_idx)
        mask = window_mask(L, window, query.device) if L > window else None
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # (B, Hq, L, D)
    else:
        alpha = binding.gates[module.layer_idx]  # (Hkv,)
        out = mix_streaming(query, key, value, alpha, binding.sink, binding.window, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, L, Hq, D)


AttentionInterface.register(IMPLEMENTATION, gated_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sparse_mask)


@contextmanager
def gated_attention(
    model: nn.Module, gates: torch.Tensor, *, sink: int, window: int
) -> Iterator[GateBinding]:
    """Run ``model``'s attention layers as gated full / streaming attention inside the block.

    Args:
        model: A transformers model whose attention goes through AttentionInterface.
        gates: (layers, Hkv) gates; may require grad.
        sink: Sink tokens of the streaming branch.
        window: Recent tokens of the streaming branch.

    Yields:
        The GateBinding the calls read (its ``sliding_layers`` fills as layers run).
    """
    layers = attention_layers(model)
    if gates.dim() != 2 or gates.shape[0] != len(layers):
        raise UsageError(
            f"gates of shape {tuple(gates.shape)}; the model needs ({len(layers)}, KV heads)"
        )
    if any(m in _BOUND for m in layers):
        raise UsageError("this model is already inside a gated_attention() block")
    binding = GateBinding(gates=gates, sink=sink, window=window)
    configs = model_configs(model)
    previous = [c._attn_implementation for c in configs]
    for layer in layers:
        _BOUND[layer] = binding
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield binding
    finally:
        for config, name in zip(configs, previous):
            config._attn_implementation = name
        for layer in layers:
            _BOUND.pop(layer, None)

"""Watch every attention call of a model: transformers' own SDPA attention, plus a callback.

Profilers that need more than the hook's (q, k) (the values, the output, its gradient) or
that must not change how attention runs register this function as an attention
implementation for the duration of a ``with attention_calls(model, callback):`` block, the way
``sparse_attention`` registers the hook: through transformers' AttentionInterface, no patched
forwards. Attention runs as transformers' SDPA path does (eager when the logits are
soft-capped, which SDPA cannot do), so outputs and gradients are the model's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..integration.hf import attention_layers, model_configs
from ..methods.estimators import grouped_scores

IMPLEMENTATION = "sparseattn_capture"


@dataclass
class AttentionCall:
    """One attention call as the model made it (tensors not detached).

    Attributes:
        layer_idx: The decoder layer.
        q: (B, Hq, Lq, D) queries after RoPE.
        k: (B, Hkv, Lk, D) keys after RoPE.
        v: (B, Hkv, Lk, D) values.
        out: (B, Lq, Hq, D) attention output.
        scaling: Softmax scale.
        window: The layer's own sliding window (query i sees keys i - window < j <= i), or None.
        softcap: Logit soft-capping, or None.
    """

    layer_idx: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    scaling: float
    window: int | None
    softcap: float | None


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Callable[[AttentionCall], None]] = (
    weakref.WeakKeyDictionary()
)


def _softcapped(query, key, value, attention_mask, scaling: float, softcap: float) -> torch.Tensor:
    """Eager soft-capped attention: (B, Lq, Hq, D)."""
    logits = grouped_scores(query, key) * scaling  # (B, Hq, Lq, Lk)
    logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None:
        attention_mask = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device)
        attention_mask = attention_mask.tril(logits.shape[-1] - logits.shape[-2])
    probs = logits.masked_fill(~attention_mask.bool(), float("-inf")).softmax(-1)
    B, Hq, Lq, _ = probs.shape
    Hkv = key.shape[1]
    rows = probs.reshape(B, Hkv, Hq // Hkv * Lq, -1)  # (B, Hkv, g Lq, Lk)
    return torch.matmul(rows, value).view(B, Hq, Lq, -1).transpose(1, 2)  # (B, Lq, Hq, D)


def _watched_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, then the active callback sees the call."""
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if softcap is None:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
        )
    else:
        out = _softcapped(query, key, value, attention_mask, scaling, softcap)
    call = AttentionCall(module.layer_idx, query, key, value, out, scaling, sliding_window, softcap)
    _ACTIVE[module](call)
    return out, None


AttentionInterface.register(IMPLEMENTATION, _watched_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def attention_calls(model: nn.Module, callback: Callable[[AttentionCall], None]) -> Iterator[None]:
    """Inside the block every attention call of ``model`` runs as transformers' SDPA and is
    handed to ``callback``; leaving it restores the model's implementation."""
    layers = attention_layers(model)
    configs = model_configs(model)
    previous = [c._attn_implementation for c in configs]
    for layer in layers:
        _ACTIVE[layer] = callback
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for config, name in zip(configs, previous):
            config._attn_implementation = name
        for layer in layers:
            _ACTIVE.pop(layer, None)


def visible_keys(start: int, end: int, keys: int, window: int | None, device=None) -> torch.Tensor:
    """(end - start, keys) bool: the keys queries at positions [start, end) of an unpadded
    pass from position 0 see (causal, and the layer's own window)."""
    query = torch.arange(start, end, device=device)[:, None]
    key = torch.arange(keys, device=device)[None, :]
    seen = key <= query
    if window is not None:
        seen = seen & (query - key < window)
    return seen

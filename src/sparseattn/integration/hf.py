"""The one hook into transformers: an attention function and a mask function, registered once.

Inside ``sparse_attention(model, ...)`` every config of the model names ``"sparseattn"`` as its
attention implementation; transformers then builds our lightweight mask (positions and padding,
never an L x L tensor) and calls ``sparse_attention_forward`` from each attention layer. Leaving
the context puts the previous implementation names back; nothing else on the model changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from ..methods.base import Method
from ..registry import build_method
from ..types import Phase
from .plan import SparsePlan, run_layer
from .stats import RunStats

IMPLEMENTATION = "sparseattn"

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, SparsePlan] = weakref.WeakKeyDictionary()
_LAST_STATS: weakref.WeakKeyDictionary[nn.Module, RunStats] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class VisibilityInfo:
    """What our mask function hands the attention layers instead of a 4-D mask.

    Attributes:
        q_offset: Absolute position of the first query.
        kv_offset: Absolute position of the first key.
        key_valid: (B, Lk) bool padding mask of the keys, or None when nothing is padded.
        local_size: The sliding window transformers built this mask for, if any.
    """

    q_offset: int
    kv_offset: int
    key_valid: torch.Tensor | None = field(default=None, repr=False)
    local_size: int | None = None


def sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> VisibilityInfo:
    """Mask function for transformers' AttentionMaskInterface: positions and padding only."""
    key_valid = None
    if attention_mask is not None:
        padding = attention_mask.bool()
        if padding.shape[-1] < kv_offset + kv_length:  # static caches: pad with "valid"
            padding = nn.functional.pad(
                padding, (0, kv_offset + kv_length - padding.shape[-1]), value=True
            )
        key_valid = padding[:, kv_offset : kv_offset + kv_length]
        if bool(key_valid.all()):
            key_valid = None
    return VisibilityInfo(int(q_offset), int(kv_offset), key_valid, local_size)


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: VisibilityInfo | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' AttentionInterface.

    Args:
        module: The attention layer (provides ``layer_idx``).
        query: (B, Hq, Lq, D).
        key: (B, Hkv, Lk, D), the whole cache for this layer.
        value: (B, Hkv, Lk, D).
        attention_mask: A VisibilityInfo from ``sparse_mask``; None means plain causal.

    Returns:
        (B, Lq, Hq, D) output and no attention weights.
    """
    model_plan = _plan_of(module)
    if isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "sparseattn received a ready-made 4-D attention mask; pass a 2-D padding mask "
            "(attention_mask of shape (batch, length)) so transformers builds our mask instead"
        )
    if attention_mask is None:
        attention_mask = VisibilityInfo(key.shape[2] - query.shape[2], 0)
    out = run_layer(
        model_plan,
        layer_idx=module.layer_idx,
        query=query,
        key=key,
        value=value,
        q_offset=attention_mask.q_offset,
        kv_offset=attention_mask.kv_offset,
        key_valid=attention_mask.key_valid,
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=sliding_window or attention_mask.local_size,
        softcap=softcap,
    )
    return out.contiguous(), None


AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sparse_mask)


def _plan_of(module: nn.Module) -> SparsePlan:
    plan = _ACTIVE.get(module)
    if plan is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) called the "
            "sparseattn attention outside a `with sparseattn.sparse_attention(model, ...)` block"
        )
    return plan


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's attention layers that route through AttentionInterface.

    Raises:
        ValueError: the model does not support attention backends, naming the layers missing.
    """
    named = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    supported = getattr(model, "_supports_attention_backend", False)
    good = [m for _, m in named if hasattr(m, "layer_idx") and hasattr(m, "config")]
    missing = [
        f"{n} ({type(m).__name__})"
        for n, m in named
        if not (hasattr(m, "layer_idx") and hasattr(m, "config"))
    ]
    if not supported or not good or missing:
        listed = (
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            if missing
            else "none found"
        )
        raise ValueError(
            f"unsupported model {type(model).__name__}: its attention does not go through "
            f"transformers' AttentionInterface (layers missing support: {listed}); supported are "
            "models whose attention layers call ALL_ATTENTION_FUNCTIONS (Llama, Qwen2/3, Mistral, "
            "Gemma 2/3, Phi-3 and most current decoder-only models)"
        )
    return good


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
            for sub in getattr(config, "sub_configs", {}) or {}:
                sub_config = getattr(config, sub, None)
                if isinstance(sub_config, PretrainedConfig):
                    seen.setdefault(id(sub_config), sub_config)
    return list(seen.values())


def _as_method(method: str | Method, knobs: dict[str, Any]) -> Method:
    if isinstance(method, Method):
        if knobs:
            raise ValueError(
                f"knobs {sorted(knobs)} given with a method instance; set them on the instance"
            )
        return method
    return build_method(method, **knobs)


@contextmanager
def sparse_attention(
    model: nn.Module,
    method: str | Method | None = None,
    *,
    prefill: str | Method | None = None,
    decode: str | Method | None = None,
    prefill_knobs: dict[str, Any] | None = None,
    decode_knobs: dict[str, Any] | None = None,
    dense_layers: Sequence[int] = (),
    min_length: int = 1024,
    prefill_backend: str = "flex",
    decode_backend: str = "gather",
    **knobs: Any,
) -> Iterator[RunStats]:
    """Make ``model`` attend sparsely inside the block.

    Either ``sparse_attention(model, "streaming", window=512)`` (one method for every phase it
    supports, dense for the others) or the two-phase form
    ``sparse_attention(model, prefill="tri_shape", decode="streaming", prefill_knobs=..., ...)``.

    Args:
        model: A transformers causal LM whose attention goes through AttentionInterface.
        method: Registered method name (or a Method instance) used for every phase it supports.
        prefill: Method for prefill and chunked prefill (two-phase form).
        decode: Method for decode steps (two-phase form).
        prefill_knobs: Knobs of the prefill method.
        decode_knobs: Knobs of the decode method.
        dense_layers: Layer indices that always attend densely (e.g. (0, 1)).
        min_length: Calls whose key length is below this stay dense (sparse would be slower).
        prefill_backend: "flex" (block-sparse kernel) or "reference" (dense fp32 oracle).
        decode_backend: "gather" (gather the kept KV, then SDPA), "flex" or "reference".
        **knobs: Knobs of ``method`` (single-method form).

    Yields:
        The RunStats that collects measured density and timing (also ``last_stats(model)``).
    """
    if method is not None and (prefill or decode or prefill_knobs or decode_knobs):
        raise ValueError("give either `method` (with its knobs) or prefill=/decode=, not both")
    if method is None and knobs:
        raise ValueError(
            f"knobs {sorted(knobs)} given without `method`; use prefill_knobs/decode_knobs"
        )
    if method is not None:
        prefill_method = decode_method = _as_method(method, knobs)
    else:
        prefill_method = _as_method(prefill or "dense", prefill_knobs or {})
        decode_method = _as_method(decode or "dense", decode_knobs or {})
    if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
        raise ValueError(f"min_length={min_length!r} must be an integer >= 0")
    layers = attention_layers(model)
    if any(m in _ACTIVE for m in layers):
        raise ValueError(
            "this model is already inside a sparse_attention() block; nesting is not supported"
        )
    n_layers = len(layers)
    bad = [i for i in dense_layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"dense_layers {bad} out of range; the model has layers 0..{n_layers - 1}")

    for bound in {id(m): m for m in (prefill_method, decode_method)}.values():
        bound.bind(model.config)  # profile-driven methods load / check their profile here

    stats = RunStats()
    plan = SparsePlan(
        prefill=prefill_method,
        decode=decode_method,
        dense_layers=frozenset(dense_layers),
        min_length=min_length,
        prefill_backend=prefill_backend,
        decode_backend=decode_backend,
        stats=stats,
    )
    configs = _configs(model)
    previous = [c._attn_implementation for c in configs]
    for layer in layers:
        _ACTIVE[layer] = plan
    _LAST_STATS[model] = stats
    try:
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield stats
    finally:
        for config, name in zip(configs, previous):
            config._attn_implementation = name
        for layer in layers:
            _ACTIVE.pop(layer, None)


def last_stats(model: nn.Module) -> RunStats:
    """Measured density and timing of the latest run of ``model`` under sparse_attention()."""
    if model not in _LAST_STATS:
        raise ValueError(
            "no stats: run the model inside `with sparseattn.sparse_attention(model, ...)` first"
        )
    return _LAST_STATS[model]


__all__ = ["IMPLEMENTATION", "Phase", "last_stats", "sparse_attention", "sparse_attention_forward"]

"""What differs between the transformers versions sparseattn supports (>= 4.56).

transformers 5.24 renamed the forward's KV-cache argument ``past_key_values`` to ``cache`` (the
old name still works there, with a deprecation warning) and the output field likewise. Before
5.24 the mask functions and ``CacheLayerMixin.get_mask_sizes`` took the call's
``cache_position`` (a tensor of the query positions) where 5.24 passes ``q_length`` and
``q_offset``, and a cache layer's ``get_max_length`` was named ``get_max_cache_shape``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its KV cache."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def passed_cache(kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """The (keyword, cache) a forward was called with, or (None, None) when none was passed."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a forward call of ``model`` in this transformers version."""
    return {cache_argument(model): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (None when the forward did not cache)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, "cache" if "cache" in fields else "past_key_values", None)


def query_length(sizes_argument: int | torch.Tensor) -> int:
    """The query length ``get_mask_sizes`` was given: an int (5.24) or ``cache_position``."""
    if isinstance(sizes_argument, torch.Tensor):
        return sizes_argument.shape[0]
    return sizes_argument

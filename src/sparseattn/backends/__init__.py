"""Backends execute a selection: ``reference`` (dense fp32 oracle), ``flex`` (block-sparse
FlexAttention, prefill), ``gather`` (decode: gather pages or tokens, then SDPA), ``sdpa`` (dense
attention straight on the cache)."""

from .flex import flex_attend
from .gather import gather_attend
from .masks import BlockLayout
from .reference import reference_attend
from .sdpa import dense_decode, dense_prefill

__all__ = [
    "BlockLayout",
    "dense_decode",
    "dense_prefill",
    "flex_attend",
    "gather_attend",
    "reference_attend",
]

"""Backends execute a selection: ``reference`` (dense fp32 oracle), ``flex`` (block-sparse
FlexAttention), ``gather`` (decode: gather the kept KV, then SDPA)."""

from .flex import flex_attend
from .gather import gather_attend
from .masks import BlockLayout
from .reference import reference_attend

__all__ = ["BlockLayout", "flex_attend", "gather_attend", "reference_attend"]

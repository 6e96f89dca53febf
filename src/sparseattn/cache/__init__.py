"""The KV cache that really forgets: layers hold only what they keep, positions stay explicit."""

from .layers import KVLayer
from .rope import RopeRotation, rope_rotation
from .sparse_cache import SparseCache, adopt, build_layers, cache_nbytes, is_empty

__all__ = [
    "KVLayer",
    "RopeRotation",
    "SparseCache",
    "adopt",
    "build_layers",
    "cache_nbytes",
    "is_empty",
    "rope_rotation",
]

"""The KV cache that really forgets: layers hold only what they keep, positions stay explicit."""

from .compensated import CompensatedLayer
from .groups import HeadGroup, HeadGroupsLayer
from .layers import KVLayer
from .ring import RingLayer
from .rope import RopeRotation, rope_rotation
from .sparse_cache import (
    OUR_LAYERS,
    CacheLayer,
    SparseCache,
    adopt,
    build_layers,
    cache_held_bytes,
    cache_nbytes,
    is_empty,
    shared_state,
)

__all__ = [
    "OUR_LAYERS",
    "CacheLayer",
    "CompensatedLayer",
    "HeadGroup",
    "HeadGroupsLayer",
    "KVLayer",
    "RingLayer",
    "RopeRotation",
    "SparseCache",
    "adopt",
    "build_layers",
    "cache_held_bytes",
    "cache_nbytes",
    "is_empty",
    "shared_state",
    "rope_rotation",
]

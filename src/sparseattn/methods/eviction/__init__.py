"""Eviction policies (``evict=...``): importing this package registers the built-in ones."""

from . import adakv, duo, moa, pyramidkv, razor, snapkv, streaming  # noqa: F401  (registration)
from .base import EvictionPolicy

__all__ = ["EvictionPolicy"]

"""Eviction policies (``evict=...``): importing this package registers the built-in ones."""

from . import adakv, pyramidkv, snapkv, streaming  # noqa: F401  (registration side effects)
from .base import EvictionPolicy

__all__ = ["EvictionPolicy"]

"""Methods choose what to compute; importing this package registers the built-in ones."""

from . import eviction, flexprefill, minference, oracle, static, xattention  # noqa: F401  (registration)
from .base import Method, knob

__all__ = ["Method", "knob"]

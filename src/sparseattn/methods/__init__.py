"""Methods choose what to compute; importing this package registers the built-in ones."""

from . import flexprefill, minference, oracle, static, xattention  # noqa: F401  (registration side effects)
from .base import Method, knob

__all__ = ["Method", "knob"]

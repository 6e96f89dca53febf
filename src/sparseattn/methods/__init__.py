"""Methods choose what to compute; importing this package registers the built-in ones."""

from . import (  # noqa: F401  (registration side effects)
    decode,
    eviction,
    flexprefill,
    minference,
    oracle,
    static,
    xattention,
)
from .base import Method, knob

__all__ = ["Method", "knob"]

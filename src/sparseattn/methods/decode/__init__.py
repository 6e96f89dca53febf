"""Decode-time selection: methods that choose, per generated token, which cached tokens to read.

Importing this package registers the built-in ones.
"""

# registration side effects
from . import (  # noqa: F401
    delta,
    double_sparsity,
    oracle,
    quest,
    retrieval,
    tidal,
    tokenselect,
)

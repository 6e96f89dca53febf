"""Decode-time selection: methods that choose, per generated token, which cached tokens to read.

Importing this package registers the built-in ones.
"""

from . import double_sparsity, oracle, quest, tokenselect  # noqa: F401  (registration side effects)

"""Methods choose what to compute: one module per method, each registering its class.

``import sparseattn`` imports the built-in method modules, which fills the registry; this
package itself imports only the base class, so the registry can build on it.
"""

from .base import Method, knob

__all__ = ["Method", "knob"]

"""Activation sparsity at decode (``activation=``): skip the weights of near-zero channels.

Importing this package registers the built-in methods: ``cats`` (the gated MLP's activations),
``teal`` (every linear layer's input) and ``rsparse`` (sparse channels plus a low-rank part).
They compose with any prefill method, decode method and eviction policy through
``sparse_attention(model, ..., activation="cats", activation_knobs={"sparsity": 0.5})`` or a
setting's ``activation=`` role, and run the kernels of ``backends/sparse_linear.py``.
"""

from . import cats, rsparse, teal  # noqa: F401  (registration)
from .base import (
    ACTIVATIONS,
    ActivationMethod,
    activation_info,
    build_activation,
    get_activation_class,
    list_activations,
    register_activation,
)
from .install import Installed, install
from .profile import ActivationProfile, load_activation_profile, save_activation_profile
from .stats import ActivationStats

__all__ = [
    "ACTIVATIONS",
    "ActivationMethod",
    "ActivationProfile",
    "ActivationStats",
    "Installed",
    "activation_info",
    "build_activation",
    "get_activation_class",
    "install",
    "list_activations",
    "load_activation_profile",
    "register_activation",
    "save_activation_profile",
]

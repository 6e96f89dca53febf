"""Activation sparsity methods: the base class, their knobs and their registry (``activation=``).

An activation method is the fourth part of a setting, beside the prefill method, the decode
method and the eviction policy: at decode steps it skips the weight columns (or rows) of the
model's linear layers whose input channels are near zero. Prefill stays dense. A method is
configuration (knobs validated on creation, a profile of calibrated thresholds loaded at
``bind``); ``wrap_layer`` returns the modules that stand in for a decoder layer's linear
layers or MLP inside ``sparse_attention(..., activation=...)``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..errors import UsageError
from ..methods.base import build_checked, knob, validate_knobs
from .modules import DecodeSwitch
from .profile import ActivationProfile, bind_activation_profile, open_activation_profile
from .stats import ActivationStats

SPARSITY_MAX = 0.95  # the highest level a profile stores


@dataclass
class ActivationMethod(ABC):
    """Skips near-zero input channels of linear layers at decode (subclasses: one per paper).

    Subclasses are dataclasses whose fields are knobs, registered with
    ``@register_activation``; they implement ``wrap_layer``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    sparsity: float = knob(
        0.5,
        low=0.0,
        high=SPARSITY_MAX,
        help="target share of input channels dropped per decode row, per linear layer",
    )
    profile: str = knob(
        "auto",
        help="'auto' (the hooked model's shipped activations profile) or a .json file written "
        "by `sparseattn profile --kind activations`",
    )

    def __post_init__(self) -> None:
        validate_knobs(self)
        if not isinstance(self.profile, str) or not self.profile:
            raise UsageError(
                f"{self.name}: knob profile={self.profile!r}; allowed: 'auto' or a .json file "
                "written by `sparseattn profile --kind activations`"
            )
        self._profile: ActivationProfile | None = open_activation_profile(self.profile)

    @property
    def label(self) -> str:
        return f"{self.name}[sparsity={self.sparsity:g}]"

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def bind(self, model: nn.Module) -> ActivationProfile:
        """Resolve 'auto' to the model's shipped profile, or check a given one matches it."""
        self._profile = bind_activation_profile(self._profile, self.profile, model)
        return self._profile

    @property
    def bound_profile(self) -> ActivationProfile:
        if self._profile is None:
            raise RuntimeError(f"{self.name}: bind(model) must run before wrap_layer")
        return self._profile

    @abstractmethod
    def wrap_layer(
        self, layer_idx: int, layer: nn.Module, switch: DecodeSwitch, stats: ActivationStats
    ) -> list[tuple[nn.Module, str, nn.Module]]:
        """The modules standing in for parts of decoder layer ``layer_idx``.

        Returns:
            (parent module, attribute name, replacement) for each part replaced; the install
            puts the originals back on exit.
        """


ACTIVATIONS: dict[str, type[ActivationMethod]] = {}


def register_activation(cls: type[ActivationMethod]) -> type[ActivationMethod]:
    """Class decorator: make activation method ``cls`` buildable by its ``name``."""
    if cls.name in ACTIVATIONS:
        raise ValueError(f"activation method {cls.name!r} is already registered")
    ACTIVATIONS[cls.name] = cls
    return cls


def list_activations() -> list[str]:
    """Names of every registered activation method, sorted."""
    return sorted(ACTIVATIONS)


def get_activation_class(name: str) -> type[ActivationMethod]:
    """The class registered as ``name``; UsageError listing the known names otherwise."""
    if name not in ACTIVATIONS:
        raise UsageError(
            f"unknown activation method {name!r}; known: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


def build_activation(name: str, **knobs: Any) -> ActivationMethod:
    """Instantiate activation method ``name`` with ``knobs`` (validated by the method)."""
    return build_checked(get_activation_class(name), "activation method", name, knobs)


def activation_info(name: str) -> dict[str, Any]:
    """Name, paper, summary and knobs of an activation method, JSON-ready."""
    cls = get_activation_class(name)
    knobs = []
    for f in dataclasses.fields(cls):
        spec = {"name": f.name, "default": f.default, "type": getattr(f.type, "__name__", f.type)}
        spec.update({k: v for k, v in f.metadata.items() if v is not None})
        knobs.append(spec)
    return {
        "name": cls.name,
        "kind": "activation",
        "paper": cls.paper,
        "summary": (cls.__doc__ or "").strip().splitlines()[0],
        "knobs": knobs,
    }

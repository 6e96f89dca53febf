"""Method registry: a plain dict from name to method class, filled by a decorator.

The registry knows no method: each method module registers its class with ``@register_method``
when it is imported, and ``import sparseattn`` imports the built-in ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import UsageError
from .methods.base import Method, build_checked

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name]}")
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(METHODS)


def get_method_class(name: str) -> type[Method]:
    """The class registered as ``name``; UsageError listing the known names otherwise."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(name: str, **knobs: Any) -> Method:
    """Instantiate method ``name`` with ``knobs`` (validated by the method itself).

    Raises:
        UsageError: unknown method, unknown knob, or a knob value outside its allowed range.
    """
    return build_checked(get_method_class(name), "method", name, knobs)


def method_info(name: str) -> dict[str, Any]:
    """Name, phases, paper and knobs (default, range, help) of a method, JSON-ready."""
    cls = get_method_class(name)
    return {
        "name": cls.name,
        "kind": "method",
        "phases": sorted(p.value for p in cls.phases),
        "paper": cls.paper,
        "speedup": cls.is_speedup,
        "summary": (cls.__doc__ or "").strip().splitlines()[0],
        "knobs": _knob_specs(cls),
    }


# -- eviction policies: their own kind (evict=...), composable with any prefill/decode method --

POLICIES: dict[str, type] = {}


def register_policy(cls: type) -> type:
    """Class decorator: make eviction policy ``cls`` buildable by its ``name``."""
    if cls.name in POLICIES:
        raise ValueError(
            f"eviction policy {cls.name!r} is already registered by {POLICIES[cls.name]}"
        )
    POLICIES[cls.name] = cls
    return cls


def list_policies() -> list[str]:
    """Names of every registered eviction policy, sorted."""
    return sorted(POLICIES)


def get_policy_class(name: str) -> type:
    """The eviction policy registered as ``name``; UsageError listing the known names otherwise."""
    if name not in POLICIES:
        raise UsageError(
            f"unknown eviction policy {name!r}; known policies: {', '.join(sorted(POLICIES))}"
        )
    return POLICIES[name]


def build_policy(name: str, **knobs: Any):
    """Instantiate eviction policy ``name`` with ``knobs`` (validated by the policy itself)."""
    return build_checked(get_policy_class(name), "eviction policy", name, knobs)


def policy_info(name: str) -> dict[str, Any]:
    """Name, paper, knobs of an eviction policy, JSON-ready (the same shape as method_info)."""
    cls = get_policy_class(name)
    return {
        "name": cls.name,
        "kind": "eviction",
        "paper": cls.paper,
        "needs_queries": cls.needs_queries,
        "summary": (cls.__doc__ or "").strip().splitlines()[0],
        "knobs": _knob_specs(cls),
    }


def _knob_specs(cls: type) -> list[dict[str, Any]]:
    specs = []
    for f in dataclasses.fields(cls):
        spec = {
            "name": f.name,
            "default": f.default,
            "type": getattr(f.type, "__name__", str(f.type)),
        }
        spec.update({k: v for k, v in f.metadata.items() if v is not None})
        specs.append(spec)
    return specs

"""What a run is made of: named things with fixed knobs (methods, policies, tasks) and settings.

A ``Setting`` is what the hook takes: a prefill method, a decode method, an eviction policy and
an activation sparsity method (decode-time weights), each a ``Spec``, plus how the prompt is fed
(whole, or in chunks of ``chunk`` tokens). It is validated and built once (``Setting.parts``); benchmarks, the
frontier and reports all use the same objects and the same labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .activation import ActivationMethod, build_activation, get_activation_class
from .errors import UsageError
from .methods.base import Method
from .methods.eviction import EvictionPolicy
from .parsing import parse_value
from .registry import build_method, build_policy, get_method_class


def labelled(name: str, knobs: dict[str, Any]) -> str:
    """'streaming' or 'streaming[sink=64,window=512]': how records and reports name a spec."""
    if not knobs:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in sorted(knobs.items()))}]"


@dataclass(frozen=True)
class Spec:
    """A registered name with fixed knobs (a method, an eviction policy or a task)."""

    name: str
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return labelled(self.name, self.knobs)

    def __hash__(self) -> int:
        return hash(self.label)

    @classmethod
    def parse(cls, text: str) -> Spec:
        """'quest' or 'quest[budget=1024,page_size=16]' -> Spec."""
        match = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[(.*)\])?\s*", text)
        if not match:
            raise UsageError(f"bad spec {text!r}; expected NAME or NAME[knob=value,...]")
        knobs = {}
        for pair in filter(None, (match.group(2) or "").split(",")):
            if "=" not in pair:
                raise UsageError(f"bad spec {text!r}: knobs are name=value")
            key, value = pair.split("=", 1)
            knobs[key.strip()] = parse_value(value.strip())
        return cls(match.group(1), knobs)


DENSE = Spec("dense")


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: (prefill method, decode method, eviction policy).

    ``Setting.single("xattention", {...})`` applies one method to every phase it supports
    (dense for the others), as ``sparse_attention(model, "xattention", ...)`` does.
    """

    prefill: Spec = DENSE
    decode: Spec = DENSE
    evict: Spec | None = None
    chunk: int | None = None  # prompt tokens per forward (chunked prefill); None: the whole prompt
    activation: Spec | None = None  # activation sparsity at decode (cats, teal, rsparse)

    def __post_init__(self) -> None:
        if self.chunk is not None and (
            isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1
        ):
            raise UsageError(f"chunk={self.chunk!r} must be an integer >= 1 (prompt tokens)")

    @classmethod
    def single(cls, method: str, knobs: dict[str, Any] | None = None) -> Setting:
        spec = Spec(method, dict(knobs or {}))
        return cls(prefill=spec, decode=spec)

    @classmethod
    def parse(cls, text: str) -> Setting:
        """'xattention[threshold=0.9]' (one method for every phase it supports) or roles joined
        by ';': 'prefill=xattention;decode=quest[budget=512];evict=streaming;chunk=2048'
        (``chunk``: the prompt is fed in chunks of that many tokens;
        ``activation=cats[sparsity=0.4]``: an activation sparsity method at decode). An
        activation method alone ('cats[sparsity=0.4]') keeps attention dense."""
        if "=" not in text.split("[", 1)[0]:
            spec = Spec.parse(text)
            if _is_activation(spec.name):
                return cls(activation=spec)
            return cls.single(spec.name, spec.knobs)
        parts: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(";"))):
            role, _, spec = item.partition("=")
            role = role.strip()
            if role == "chunk":
                value = parse_value(spec.strip())
                parts["chunk"] = value
                continue
            if role not in ("prefill", "decode", "evict", "activation"):
                raise UsageError(
                    f"bad setting {text!r}: roles are prefill=, decode=, evict=, activation=, "
                    f"chunk= (got {role!r})"
                )
            parts[role] = Spec.parse(spec)
        return cls(**parts)

    @property
    def is_single(self) -> bool:
        return self.prefill == self.decode

    @property
    def label(self) -> str:
        """How records and reports name the setting (one method keeps its own label)."""
        if self.is_single and self.evict is None and self.chunk is None and not self.activation:
            return self.prefill.label
        parts = [self.prefill.label] if self.is_single and self.prefill != DENSE else []
        if not self.is_single:
            parts += [f"prefill={self.prefill.label}", f"decode={self.decode.label}"]
        if self.evict is not None:
            parts.append(f"evict={self.evict.label}")
        if self.chunk is not None:
            parts.append(f"chunk={self.chunk}")
        if self.activation is not None:
            parts.append(f"activation={self.activation.label}")
        return ";".join(parts)

    @property
    def family(self) -> str:
        """The methods and policy without knobs: what a curve of the frontier groups."""
        if self.is_single:
            names = [self.prefill.name]
        else:
            names = [self.prefill.name, self.decode.name]
        if self.evict is not None:
            names.append(f"evict:{self.evict.name}")
        if self.chunk is not None:
            names.append("chunked")
        if self.activation is not None:
            names.append(f"act:{self.activation.name}")
        return "+".join(names)

    def phase_policy(self) -> dict[str, str | None]:
        """Which method runs in each phase and which policy evicts (names only)."""
        prefill_cls = get_method_class(self.prefill.name)
        decode_cls = get_method_class(self.decode.name)
        from .types import Phase

        return {
            "prefill": self.prefill.name if Phase.PREFILL in prefill_cls.phases else "dense",
            "decode": self.decode.name if Phase.DECODE in decode_cls.phases else "dense",
            "evict": self.evict.name if self.evict else None,
        }

    @cached_property
    def parts(self) -> tuple[Method, Method, EvictionPolicy | None]:
        """The built method and policy objects (validated once; reusable across runs)."""
        prefill = build_method(self.prefill.name, **self.prefill.knobs)
        decode = prefill if self.is_single else build_method(self.decode.name, **self.decode.knobs)
        policy = build_policy(self.evict.name, **self.evict.knobs) if self.evict else None
        return prefill, decode, policy

    @cached_property
    def activation_part(self) -> ActivationMethod | None:
        """The built activation method (validated once), or None."""
        if self.activation is None:
            return None
        return build_activation(self.activation.name, **self.activation.knobs)

    def hook_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sparse_attention`` for this setting (built objects)."""
        prefill, decode, policy = self.parts
        extra = {} if self.activation is None else {"activation": self.activation_part}
        if self.is_single:
            return {"method": prefill, "evict": policy, **extra}
        return {"prefill": prefill, "decode": decode, "evict": policy, **extra}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready; ``activation`` only when set (records of earlier runs stay equal)."""
        out = {
            "prefill": {"name": self.prefill.name, "knobs": self.prefill.knobs},
            "decode": {"name": self.decode.name, "knobs": self.decode.knobs},
            "evict": None
            if self.evict is None
            else {"name": self.evict.name, "knobs": self.evict.knobs},
            "chunk": self.chunk,
        }
        if self.activation is not None:
            out["activation"] = {"name": self.activation.name, "knobs": self.activation.knobs}
        return out


def _is_activation(name: str) -> bool:
    try:
        get_activation_class(name)
    except UsageError:
        return False
    return True

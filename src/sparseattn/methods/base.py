"""Base class of every method: knobs as validated dataclass fields, one ``select`` function."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..backends.masks import BlockLayout
from ..errors import UsageError
from ..types import (
    AttentionContext,
    BlockSelection,
    DecodeView,
    PageSelection,
    Phase,
    TokenSelection,
)

PREFILL_PHASES = frozenset({Phase.PREFILL, Phase.CHUNKED_PREFILL})
ALL_PHASES = frozenset(Phase)


def knob(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple | None = None,
    help: str = "",
) -> Any:
    """A method knob: a dataclass field with its allowed range and a one-line help."""
    return field(
        default=default, metadata={"min": low, "max": high, "choices": choices, "help": help}
    )


def validate_knobs(obj: Any) -> None:
    """ValueError naming the knob, its value and the allowed range for every violation."""
    owner = getattr(obj, "name", type(obj).__name__)
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if meta.get("choices") is not None:
            if value not in meta["choices"]:
                raise UsageError(
                    f"{owner}: knob {f.name}={value!r} is not allowed; choose one of {list(meta['choices'])}"
                )
            continue
        if meta.get("min") is None and meta.get("max") is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise UsageError(f"{owner}: knob {f.name}={value!r} must be a number")
        low = -math.inf if meta["min"] is None else meta["min"]
        high = math.inf if meta["max"] is None else meta["max"]
        if not low <= value <= high:
            raise UsageError(
                f"{owner}: knob {f.name}={value!r} is out of range; allowed: [{low}, {high}]"
            )


def build_checked(cls: type, kind: str, name: str, knobs: dict[str, Any]) -> Any:
    """``cls(**knobs)``, with a ValueError listing the allowed knobs if one is unknown.

    Args:
        cls: A dataclass whose fields are knobs (a method or a task).
        kind: "method" or "task", for the message.
        name: The registered name, for the message.
        knobs: Keyword arguments to check and pass.
    """
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - allowed)
    if unknown:
        raise UsageError(
            f"unknown knob(s) {', '.join(map(repr, unknown))} for {kind} {name!r}; "
            f"allowed knobs: {', '.join(sorted(allowed)) or '(none)'}"
        )
    return cls(**knobs)


@dataclass(frozen=True)
class PrefillCall:
    """What a prefill kernel runs: keys, values, context and tiles (``Method.rearrange``).

    The queries stay as they are, so the kernel's output rows need no reordering. Every
    (query, key) pair of the original call that the tiles compute appears exactly once, so
    ``layout.density(selection)`` counts the pairs computed.

    Attributes:
        k: (B, Hkv, Lk', D) keys the kernel reads.
        v: (B, Hkv, Lk', Dv) their values.
        ctx: The call the kernel runs (contiguous key positions).
        layout: BlockLayout of ``ctx`` at the method's block size.
        selection: Finalized tiles over ``layout``.
    """

    k: torch.Tensor
    v: torch.Tensor
    ctx: AttentionContext
    layout: BlockLayout
    selection: BlockSelection


@dataclass
class Method(ABC):
    """A sparse attention method: chooses which tiles (or tokens) each query attends to.

    Subclasses are dataclasses whose fields are the knobs, registered with
    ``@register_method``; they implement ``select``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phases: ClassVar[frozenset[Phase]] = ALL_PHASES
    is_speedup: ClassVar[bool] = True  # False for analysis methods such as the oracle
    dense_limit: ClassVar[dict[str, Any]] = {}  # knob values at which the method equals dense
    default_grid: ClassVar[dict[str, list[Any]]] = {}  # knob values the frontier sweeps by default
    # the prefill tiles depend on the call's shape only (never on q or k): the layers of one
    # forward share one selection and whatever a backend derives from it
    static_pattern: ClassVar[bool] = False
    # decode: a budget covering every held key returns None (dense SDPA, the same output for
    # less work); False runs the selection over every key (tests check that it equals dense)
    dense_when_covered: ClassVar[bool] = True

    block_size: int = knob(128, choices=(16, 32, 64, 128, 256), help="tile size b in tokens")

    def __post_init__(self) -> None:
        validate_knobs(self)

    def supports(self, phase: Phase) -> bool:
        return phase in self.phases

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def bind(self, config: Any) -> None:
        """Called by ``sparse_attention`` with the model's config before any attention call.

        Methods driven by a per-model profile load it (or check it matches) here; others ignore it.
        """

    def select(
        self, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, layout: BlockLayout
    ) -> BlockSelection:
        """Choose tiles (prefill and chunked prefill; called only for the phases supported).

        Args:
            q: (B, Hq, Lq, D) queries.
            k: (B, Hkv, Lk, D) keys.
            ctx: The call's context.
            layout: Block view of the base mask at ``self.block_size``.

        Returns:
            A finalized BlockSelection (``layout.finalize``): diagonal kept, invisible tiles dropped.
        """
        raise TypeError(f"method {self.name!r} declares prefill support but has no select")

    def rearrange(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttentionContext,
        layout: BlockLayout,
    ) -> PrefillCall | None:
        """Optional: run this prefill call on rearranged keys instead of ``select``'s tiles.

        A method that reorders keys (PBS-Attn permutes them inside segments so important keys
        share tiles) returns the call the kernel runs; None (the default) runs ``select``'s
        tiles on the call as it is.

        Args:
            q: (B, Hq, Lq, D) queries.
            k: (B, Hkv, Lk, D) keys.
            v: (B, Hkv, Lk, Dv) values.
            ctx: The call's context.
            layout: Block view of the base mask at ``self.block_size``.
        """
        return None

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> PageSelection | TokenSelection | None:
        """Choose what one decode query per head reads, with a static (budget-sized) shape.

        Called only when the method supports ``Phase.DECODE``. Must not read values back to the
        host (no ``.item()``, no data-dependent sizes): the shape comes from knobs and lengths.

        Args:
            q: (B, Hq, 1, D) the new token's queries.
            view: The layer's held keys and the method's state.
            ctx: The call's context (key positions, padding, window).

        Returns:
            Pages or tokens to read, one row per KV head or per query head; None reads every
            held key (dense).
        """
        raise TypeError(f"method {self.name!r} declares decode support but has no select_decode")

    def max_tiles_per_row(self, layout: BlockLayout) -> int | None:
        """Upper bound on tiles kept per query-tile row, or None for mass-threshold methods."""
        return None

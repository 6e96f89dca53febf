"""How ``sparse_attention`` runs besides the methods themselves: backends, page size, which
calls stay dense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backends.tiles import PREFILL_BACKENDS
from ..errors import UsageError

DECODE_BACKENDS = ("gather", "reference")
PAGE_SIZES = (8, 16, 32, 64, 128, 256)
DECODE_MIN_LENGTH = 1024  # what min_length="auto" means for decode steps


@dataclass(frozen=True)
class HookOptions:
    """How ``sparse_attention`` runs, besides the methods themselves (validated on creation).

    Attributes:
        dense_layers: Layer indices that always attend densely.
        min_length: Calls whose key length is below this stay dense (sparse would be slower).
            "auto": a prompt chunk uses the crossover measured for its method (with its
            estimation), kernel, device, dtype and head layout (once per machine, cached; see
            ``integration/crossover.py``), a decode step ``DECODE_MIN_LENGTH``.
        prefill_backend: "auto" (the C++ kernel for float32 on the CPU, else FlexAttention),
            "cpp" (the C++ block-sparse kernel), "flex" (FlexAttention) or "reference" (dense
            fp32 oracle).
        decode_backend: "gather" (gather the selected pages, then SDPA) or "reference".
        page_size: Cache storage granularity in tokens (a page view of the cache is free).
        timing: Time selection and attention per layer (synchronizes; off by default).
        lean_decode: Decode steps of Llama / Mistral / Qwen2 layers run the lean forward of
            ``integration/step.py`` (the same arithmetic without the modules' dispatch).
    """

    dense_layers: frozenset[int] = frozenset()
    min_length: int | str = "auto"
    prefill_backend: str = "auto"
    decode_backend: str = "gather"
    page_size: int = 16
    timing: bool = False
    lean_decode: bool = True

    def __post_init__(self) -> None:
        if self.prefill_backend not in PREFILL_BACKENDS:
            raise UsageError(
                f"prefill_backend={self.prefill_backend!r}; allowed: {list(PREFILL_BACKENDS)}"
            )
        if self.decode_backend not in DECODE_BACKENDS:
            raise UsageError(
                f"decode_backend={self.decode_backend!r}; allowed: {list(DECODE_BACKENDS)}"
            )
        if not isinstance(self.lean_decode, bool):
            raise UsageError(f"lean_decode={self.lean_decode!r}; allowed: True, False")
        if self.page_size not in PAGE_SIZES:
            raise UsageError(f"page_size={self.page_size!r}; allowed: {list(PAGE_SIZES)}")
        if self.min_length == "auto":
            return
        bad = isinstance(self.min_length, bool) or not isinstance(self.min_length, int)
        if bad or self.min_length < 0:
            raise UsageError(f"min_length={self.min_length!r} must be an integer >= 0 or 'auto'")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sparse_attention`` (JSON-ready)."""
        return {
            "dense_layers": sorted(self.dense_layers),
            "min_length": self.min_length,
            "prefill_backend": self.prefill_backend,
            "decode_backend": self.decode_backend,
            "page_size": self.page_size,
            "timing": self.timing,
            # named only when off: records and run configs from before it stay comparable
            **({} if self.lean_decode else {"lean_decode": False}),
        }

"""Which kernel runs a prefill tile selection: ``auto``, ``cpp``, ``flex`` or ``reference``.

``auto`` (the default) takes the C++ kernel where it can run the call (float32 on the CPU, the
kernel built or buildable) and FlexAttention everywhere else (CUDA, half precision, a machine
without a compiler). ``cpp`` and ``flex`` force one kernel; ``reference`` is the dense fp32
oracle. A static pattern's selection and density are derived once per layout (call shape) and
shared by every layer that sees that shape.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..types import AttentionContext, BlockSelection
from . import cpp
from .flex import flex_attend
from .masks import BlockLayout
from .reference import reference_attend

PREFILL_BACKENDS = ("auto", "cpp", "flex", "reference")


def tile_kernel(requested: str, q: torch.Tensor, ctx: AttentionContext) -> str:
    """The kernel a call runs on: ``requested``, with ``auto`` resolved to ``cpp`` or ``flex``.

    Raises:
        UsageError: ``cpp`` was asked for a call it cannot run (naming why).
    """
    if requested == "auto":
        return "cpp" if cpp.supports(q, ctx) and cpp.available() else "flex"
    if requested == "cpp":
        if not cpp.supports(q, ctx):
            raise UsageError(
                f"prefill_backend='cpp' runs float32 on the CPU; this call is {q.dtype} on "
                f"{q.device.type}: use 'auto' or 'flex'"
            )
        if not cpp.available():
            raise UsageError(
                f"prefill_backend='cpp' is unavailable here ({cpp.reason()}); use 'auto' or 'flex'"
            )
    return requested


def attend_tiles(
    requested: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    ctx: AttentionContext,
    layout: BlockLayout,
) -> torch.Tensor:
    """Run a finalized selection on the requested backend. Returns (B, Lq, Hq, Dv)."""
    kernel = tile_kernel(requested, q, ctx)
    if kernel == "cpp":
        return cpp.cpp_attend(q, k, v, selection, ctx, layout)
    if kernel == "flex":
        return flex_attend(q, k, v, selection, ctx, layout)
    return reference_attend(q, k, v, selection, ctx)


def select_once(
    method, q: torch.Tensor, k: torch.Tensor, ctx: AttentionContext, layout: BlockLayout
) -> BlockSelection:
    """``method.select``; a static pattern (``method.static_pattern``) is selected once per
    layout, so the layers of a forward (and later forwards of the same shape) share it."""
    if not method.static_pattern:
        return method.select(q, k, ctx, layout)
    key = ("selection", id(method), ctx.num_q_heads)
    cached = layout.shared.get(key)
    if cached is None or cached[0] is not method:
        chosen = method.select(q, k, ctx, layout)
        selection = BlockSelection(chosen.mask.contiguous(), chosen.block_size, static=True)
        cached = layout.shared[key] = (method, selection)
    return cached[1]


def density_once(
    layout: BlockLayout, selection: BlockSelection
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layout.density(selection)``, counted once per layout for a static selection."""
    if not selection.static:
        return layout.density(selection)
    key = ("density", id(selection))
    cached = layout.shared.get(key)
    if cached is None or cached[0] is not selection:
        cached = layout.shared[key] = (selection, layout.density(selection))
    return cached[1]


def random_tiles(layout: BlockLayout, density: float, seed: int) -> torch.Tensor:
    """(1, Hq, nQ, nK) bool: each visible off-diagonal tile kept with probability ~density.

    The probability is corrected for the always-kept diagonal so the measured density lands
    near the target.
    """
    g = torch.Generator().manual_seed(seed)
    n = layout.n_q_blocks
    causal_tiles = n * (n + 1) / 2
    p = max(0.0, (density * causal_tiles - n) / max(causal_tiles - n, 1))
    heads = layout.ctx.num_q_heads
    raw = torch.rand(1, heads, n, layout.n_kv_blocks, generator=g) < p
    return raw.to(layout.ctx.device)

"""Linear layers over a few rows that read only the weights of the active channels.

Activation sparsity at decode (CATS arXiv:2404.08763, TEAL arXiv:2408.14690, R-Sparse
arXiv:2504.19449): a row keeps a channel when its value is nonzero and ``|value| >= threshold``;
a dropped value counts as zero. The weights of a channel no row keeps are never read (the union
over the batch rows is what a step reads). Two shapes:

- ``sparse_input_linear(x, wt, bias, t)``: y = x_kept W^T + bias over a weight re-laid out
  once as ``wt = W^T`` (in, out), so an input channel is one contiguous row of ``wt``;
- ``sparse_output_linear(x, w, gate, bias, t)``: h = gate_kept * (x W^T + bias), computing only
  the output channels some row's gate keeps, over W (out, in) as nn.Linear stores it.

Both run the C++ kernels of ``csrc/sparse_linear.cpp`` (float32 on the CPU, built with the
other kernels by ``cpp.py``) and fall back to ``index_select`` + ``matmul`` on the CPU (no
compiler, another dtype), or to a masked dense product elsewhere (no data-dependent shapes on a
GPU, so no speedup there either). Every path adds to ``counts`` (int64, 4) in place: active
channels (union over rows), channels, kept (row, channel) entries, (row, channel) entries.

Run it on its own (``python -m sparseattn.backends.sparse_linear``) to compare the kernel with
the dense product at a few sparsities.
"""

from __future__ import annotations

import torch

from . import cpp

_NO_BIAS = torch.empty(0)


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether the C++ kernel runs these rows (float32 on the CPU, kernel built)."""
    return cpp.runs_on(x) and cpp.available()


def _keep(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return (x != 0) & (x.abs() >= threshold)


def _count(counts: torch.Tensor, keep: torch.Tensor, active: torch.Tensor) -> None:
    rows, channels = keep.shape
    totals = torch.stack(
        [active.sum(), torch.tensor(channels), keep.sum(), torch.tensor(rows * channels)]
    )
    counts.add_(totals.to(counts.device))


def sparse_input_linear(
    x: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    counts: torch.Tensor,
) -> torch.Tensor:
    """y = x_kept @ wt + bias, reading only the rows of ``wt`` some row of ``x`` keeps.

    Args:
        x: (R, in) rows.
        wt: (in, out) contiguous, the layer's weight transposed once.
        bias: (out,) or None.
        threshold: Keep |x| >= threshold (and x != 0).
        counts: (4,) int64 counters, added to in place.

    Returns:
        (R, out).
    """
    if uses_kernel(x) and wt.dtype == torch.float32:
        b = _NO_BIAS if bias is None else bias
        return torch.ops.sparseattn.sparse_input_linear(x, wt, b, float(threshold), counts)
    keep = _keep(x, threshold)  # (R, in)
    active = keep.any(0)  # (in,)
    _count(counts, keep, active)
    kept = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if x.device.type == "cpu":
        idx = active.nonzero().squeeze(1)  # (n,)
        y = kept.index_select(1, idx) @ wt.index_select(0, idx)  # (R, n) @ (n, out)
    else:
        y = kept @ wt
    return y if bias is None else y + bias


def sparse_output_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    counts: torch.Tensor,
) -> torch.Tensor:
    """h = gate_kept * (x @ w.T + bias), computing only the output channels some row keeps.

    Args:
        x: (R, in) rows.
        w: (out, in) contiguous weight (nn.Linear's layout).
        gate: (R, out) the values whose magnitude decides (CATS: SiLU of the gate projection).
        bias: (out,) or None.
        threshold: Keep |gate| >= threshold (and gate != 0).
        counts: (4,) int64 counters, added to in place.

    Returns:
        (R, out), zero where the row drops the channel.
    """
    if uses_kernel(x) and w.dtype == torch.float32 and gate.dtype == torch.float32:
        b = _NO_BIAS if bias is None else bias
        return torch.ops.sparseattn.sparse_output_linear(x, w, gate, b, float(threshold), counts)
    keep = _keep(gate, threshold)  # (R, out)
    active = keep.any(0)  # (out,)
    _count(counts, keep, active)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        idx = active.nonzero().squeeze(1)  # (n,)
        part = x @ w.index_select(0, idx).T  # (R, n)
        if bias is not None:
            part = part + bias.index_select(0, idx)
        h = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        h.index_copy_(1, idx, part)
    else:
        h = x @ w.T if bias is None else x @ w.T + bias
    return torch.where(keep, gate * h, zero)


def _demo() -> None:
    """Kernel vs dense product at a few sparsities, and the time of each."""
    import time

    torch.manual_seed(0)
    rows, d_in, d_out = 1, 1536, 576
    w = torch.randn(d_out, d_in)
    wt = w.T.contiguous()
    x = torch.randn(rows, d_in)
    print(f"kernel: {'C++' if uses_kernel(x) else 'torch fallback'}; W {d_out}x{d_in}")
    for sparsity in (0.0, 0.25, 0.5, 0.75):
        t = float(x.abs().quantile(sparsity)) if sparsity else 0.0
        counts = torch.zeros(4, dtype=torch.long)
        y = sparse_input_linear(x, wt, None, t, counts)
        want = torch.where(x.abs() >= t, x, 0.0) @ w.T
        start = time.perf_counter()
        for _ in range(200):
            sparse_input_linear(x, wt, None, t, counts)
        each = (time.perf_counter() - start) / 200
        start = time.perf_counter()
        for _ in range(200):
            torch.nn.functional.linear(x, w)
        dense = (time.perf_counter() - start) / 200
        err = float((y - want).abs().max())
        print(
            f"sparsity {sparsity:.2f}: max |err| {err:.2e}, {each * 1e6:.0f} us "
            f"(dense {dense * 1e6:.0f} us)"
        )


if __name__ == "__main__":
    _demo()

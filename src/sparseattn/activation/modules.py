"""The modules that stand in for a decoder layer's linear layers or MLP inside the hook.

Each keeps the original's parameters under the original's names (the same Parameter objects:
``state_dict`` and ``named_parameters`` read the same inside the block) and runs exactly the
original computation unless the forward is a decode step (``DecodeSwitch``), where it reads
only the weights of the active channels (``backends/sparse_linear.py``). A weight re-laid out
for the kernel (W^T, input channels as contiguous rows) is made at the first decode step and
dropped with the module when the block ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..backends.sparse_linear import sparse_input_linear, sparse_output_linear
from .stats import SiteCounter


@dataclass
class DecodeSwitch:
    """Set before every forward of the decoder: True for a decode step (one new token per row
    over a cache that already holds tokens), when the stand-in modules run sparse."""

    decoding: bool = False


class SparseLinear(nn.Module):
    """nn.Linear at prefill; at decode, input channels with |x| < threshold are skipped.

    With a low-rank part (R-Sparse, arXiv:2504.19449) the skipped inputs are not dropped but
    go through the weight's top singular directions: y = W x_kept + (x_rest V_r) (U_r S_r)^T.

    Args:
        linear: The nn.Linear it stands in for (its weight and bias are shared, not copied).
        threshold: Keep |x| >= threshold at decode.
        counter: Where its counts go.
        switch: The install's decode switch.
        low_rank: (V_r (in, r), (U_r S_r)^T (r, out)) or None.
    """

    def __init__(
        self,
        linear: nn.Linear,
        threshold: float,
        counter: SiteCounter,
        switch: DecodeSwitch,
        low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.threshold = float(threshold)
        self._counter, self._switch, self._low_rank = counter, switch, low_rank
        self._wt: torch.Tensor | None = None

    def extra_repr(self) -> str:
        rank = 0 if self._low_rank is None else self._low_rank[0].shape[1]
        return (
            f"{self.in_features}, {self.out_features}, threshold={self.threshold:.4g}, rank={rank}"
        )

    def relaid_weight(self) -> torch.Tensor:
        """W^T (in, out), made at the first decode call (the kernel's layout)."""
        if self._wt is None:
            self._wt = self.weight.detach().t().contiguous()
        return self._wt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._switch.decoding:
            return F.linear(x, self.weight, self.bias)
        wt = self.relaid_weight()
        rows = x.reshape(-1, self.in_features)  # (R, in)
        self._counter.calls += 1
        y = sparse_input_linear(rows, wt, self.bias, self.threshold, self._counter.counts)
        if self._low_rank is not None:
            down, up = self._low_rank  # (in, r), (r, out)
            rest = torch.where(rows.abs() >= self.threshold, 0.0, rows)  # (R, in)
            y = y + (rest @ down) @ up
        return y.view(*x.shape[:-1], self.out_features)


class CatsMLP(nn.Module):
    """A gated MLP at prefill; at decode CATS (arXiv:2404.08763): gate_proj runs dense, channels
    with |act(gate)| < threshold are zero, up_proj computes only the kept rows and down_proj
    reads only the kept columns.

    The original MLP's gate_proj / up_proj / down_proj / act_fn are registered under their own
    names; the original module runs every non-decode forward.
    """

    def __init__(
        self,
        mlp: nn.Module,
        threshold: float,
        up_counter: SiteCounter,
        down_counter: SiteCounter,
        switch: DecodeSwitch,
    ) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn
        self.threshold = float(threshold)
        object.__setattr__(self, "_mlp", mlp)  # not a submodule: parameter names unchanged
        self._up_counter, self._down_counter, self._switch = up_counter, down_counter, switch
        self._down_t: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}"

    def down_transposed(self) -> torch.Tensor:
        """down_proj's W^T (I, H), made at the first decode call (the kernel's layout)."""
        if self._down_t is None:
            self._down_t = self.down_proj.weight.detach().t().contiguous()
        return self._down_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._switch.decoding:
            return self._mlp(x)
        down_t = self.down_transposed()
        rows = x.reshape(-1, x.shape[-1])  # (R, H)
        gate = self.act_fn(self.gate_proj(rows))  # (R, I), dense
        self._up_counter.calls += 1
        self._down_counter.calls += 1
        up = self.up_proj
        hidden = sparse_output_linear(
            rows, up.weight, gate, up.bias, self.threshold, self._up_counter.counts
        )  # (R, I), zero off the kept channels
        out = sparse_input_linear(
            hidden, down_t, self.down_proj.bias, 0.0, self._down_counter.counts
        )  # (R, H)
        return out.view(*x.shape[:-1], out.shape[-1])

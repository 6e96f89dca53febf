"""The lean decode step: a decoder layer's one-token forward as two C++ calls around the
cache update and the attention method.

At batch 1 a decode step of a small model is mostly fixed cost: SmolLM2-135M runs ~12 module
calls per layer (norms, four projections, the MLP and its three linears, the hub-kernel
wrappers around them), ~25 ops, and their Python dispatch, for 30 layers. Measured on the
2-core CPU at 16 cached tokens: 43.7 ms per step of which the linear layers are 25.7 ms.
``install_lean`` replaces, inside ``sparse_attention``, the forward of every decoder layer of
a supported family by one function that does the same arithmetic directly:

- ``decode_qkv`` (C++, ``backends/csrc/decode_step.cpp``): RMSNorm, the q/k/v projections on
  the modules' own weights (no copies: the model's memory stays what it was), RoPE;
- the cache write through the same ``update`` and the attention through the same registered
  function, in Python (so every decode method and eviction policy runs unchanged); plain dense
  decode (no eviction, a plain cache layer, every key visible) takes the hook's shortcut
  (``decode.dense_lane``: the same kernel call and stats without the general path's context);
- ``decode_mlp`` (C++): o projection, residual, RMSNorm, the SiLU-gated MLP, residual.

Each half's weights are registered with the C++ side once (``DecodeSpec``) and named by a
number per call.

TEAL's and R-Sparse's stand-ins (input thresholds on weights re-laid once, R-Sparse's low-rank
part) and CATS's MLP run inside the two calls with their own kernels and counters; other
activations, other dtypes, or kernels that cannot be built take the same steps as Python ops
(RMSNorm op for op, ``F.linear``, the stand-ins called as modules). Together the two calls
save ~40 Python ops per layer (about 5-9 ms a step on SmolLM2 at 4K on the 2-core CPU).

The lean forward runs only where it is exact: one token per row, a cache whose layer is
sparseattn's, no gradient, keyword arguments only. Anything else (prompts, other caches,
training) calls the layer's original forward. Families: Llama (SmolLM2), Mistral, Qwen2 (their
attention layers differ only in biases and in which sliding window they pass); Gemma 3's
layers (extra norms, q/k norms, scaled embeddings) keep their own forward.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import HeadGroupsLayer, KVLayer

COUNTER = "lean_decode_layers"
FUSED = "fused_decode_layers"  # lean calls that ran the C++ halves
LANE = "dense_lane_layers"  # lean calls whose attention took the plain dense shortcut


def _no_window(attention: nn.Module) -> int | None:
    return None


def _own_window(attention: nn.Module) -> int | None:
    return getattr(attention, "sliding_window", None)


def _config_window(attention: nn.Module) -> int | None:
    return getattr(attention.config, "sliding_window", None)


# decoder layer class -> (MLP class name, the sliding window its attention passes)
FAMILIES: dict[str, tuple[str, Callable[[nn.Module], int | None]]] = {
    "LlamaDecoderLayer": ("LlamaMLP", _no_window),
    "MistralDecoderLayer": ("MistralMLP", _config_window),
    "Qwen2DecoderLayer": ("Qwen2MLP", _own_window),
}


def supports(layer: nn.Module) -> bool:
    """Whether ``layer`` is of a family the lean step knows, in a transformers version whose
    decoder layer returns the hidden states tensor (not a tuple) and gets RoPE's cos/sin."""
    family = FAMILIES.get(type(layer).__name__)
    if family is None or not hasattr(layer, "self_attn") or not hasattr(layer, "mlp"):
        return False
    signature = inspect.signature(type(layer).forward)
    returns = signature.return_annotation
    tensor_out = returns is torch.Tensor or returns in ("torch.Tensor", "Tensor")
    return tensor_out and "position_embeddings" in signature.parameters


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The model's RMSNorm, op for op (variance in float32, weight applied in the input dtype).
    ``F.rms_norm`` gives the same bits but its fused CPU kernel costs ~57 us on a 576-wide row
    against ~15 us for these five small ops (measured on SmolLM2's decode step)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * h.to(x.dtype)


def _project(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A projection: ``F.linear`` on a plain Linear's weights, any stand-in as a module."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeSpec:
    """One half's weights registered with the C++ halves (``decode_spec``), named by the
    integer each step passes instead of the ~25 tensors (a Python list of tensors costs ~15 us
    a call to hand to an op). The registry holds references to the module's own tensors (no
    copies); the entry is let go of when this object is collected.

    Args:
        norm_weight, eps: The half's RMSNorm.
        specs: Per linear layer (weight, re-laid weight, bias, threshold, counts, low-rank
            down, low-rank up), empty tensors where absent.
        cats: CATS's threshold on |silu(gate)| (the MLP half), or -1.
    """

    def __init__(
        self, norm_weight: torch.Tensor, eps: float, specs: list[tuple], cats: float = -1.0
    ) -> None:
        columns = [list(column) for column in zip(*specs)]
        self.id = int(torch.ops.sparseattn.decode_spec(norm_weight, eps, *columns, cats))
        done = weakref.finalize(self, torch.ops.sparseattn.decode_spec_free, self.id)
        done.atexit = False  # at exit the whole registry goes with the library


@dataclass(frozen=True)
class FusedArgs:
    """A layer's weights as the C++ halves take them (``decode_qkv`` / ``decode_mlp``), and the
    activation stand-ins' decode switches and counters (their ``calls`` go up by one per fused
    call, as when they run as modules)."""

    qkv: DecodeSpec  # input norm; q, k, v
    mlp: DecodeSpec  # post-attention norm; o, gate, up, down; CATS's threshold or -1
    switches: tuple  # the stand-ins' DecodeSwitch objects (all must say decoding)
    counters: tuple  # the stand-ins' SiteCounter objects


_NONE = torch.empty(0)


def _modules(layer: nn.Module) -> tuple[nn.Module, ...]:
    attention, mlp = layer._modules["self_attn"], layer._modules["mlp"]
    linears = attention._modules
    return (
        linears["q_proj"],
        linears["k_proj"],
        linears["v_proj"],
        linears["o_proj"],
        mlp,
        layer._modules["input_layernorm"],
        layer._modules["post_attention_layernorm"],
    )


def _spec(linear: nn.Module, switches: list, counters: list) -> tuple | None:
    """(weight, re-laid weight, bias, threshold, counts, low-rank down, low-rank up) of a plain
    nn.Linear (dense) or of a TEAL / R-Sparse stand-in; None for anything else."""
    from ..activation.modules import SparseLinear

    bias = _NONE if linear.bias is None else linear.bias
    if type(linear) is nn.Linear:
        return (linear.weight, _NONE, bias, 0.0, _NONE, _NONE, _NONE)
    if type(linear) is SparseLinear:
        switches.append(linear._switch)
        counters.append(linear._counter)
        wt = linear.relaid_weight()
        down, up = linear._low_rank or (_NONE, _NONE)
        return (linear.weight, wt, bias, linear.threshold, linear._counter.counts, down, up)
    return None


def _fused_args(layer: nn.Module, mlp_class: str) -> FusedArgs | None:
    """The C++ halves' arguments, or None where they do not apply: the kernels unavailable,
    weights not float32 on the CPU, an activation other than SiLU, a module the halves do not
    know, an MLP that is neither the family's own nor CATS's."""
    from ..activation.modules import CatsMLP
    from ..backends import cpp

    q, k, v, o, mlp, norm1, norm2 = _modules(layer)
    names = ("gate_proj", "up_proj", "down_proj")
    gate, up, down = (getattr(mlp, n, None) for n in names)
    own, cats = type(mlp).__name__ == mlp_class, type(mlp) is CatsMLP
    act = type(getattr(mlp, "act_fn", None)).__name__
    if not (own or cats) or act not in ("SiLU", "SiLUActivation") or down is None:
        return None
    switches: list = []
    counters: list = []
    specs = [_spec(m, switches, counters) for m in (q, k, v, o, gate, up, down)]
    if any(spec is None for spec in specs):
        return None
    if cats:  # the stand-in's own kernels: dense gate, sparse up rows and down columns
        switches.append(mlp._switch)
        counters += [mlp._up_counter, mlp._down_counter]
        counts = (mlp._up_counter.counts, mlp._down_counter.counts)
        specs[5] = (up.weight, _NONE, specs[5][2], 0.0, counts[0], _NONE, _NONE)
        specs[6] = (down.weight, mlp.down_transposed(), specs[6][2], 0.0, counts[1], _NONE, _NONE)
    tensors = [spec[0] for spec in specs] + [norm1.weight, norm2.weight]
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return None
    if not (cpp.enabled() and cpp.available()):
        return None
    eps1, eps2 = (float(getattr(n, "variance_epsilon", None) or n.eps) for n in (norm1, norm2))
    qkv = DecodeSpec(norm1.weight, eps1, specs[:3])
    mlp_spec = DecodeSpec(norm2.weight, eps2, specs[3:], mlp.threshold if cats else -1.0)
    # every stand-in of one install shares its switch: check each distinct one once per call
    switches = tuple({id(s): s for s in switches}.values())
    return FusedArgs(qkv, mlp_spec, switches, tuple(counters))


def _fused_takes(h: torch.Tensor, embeddings: tuple, fused: FusedArgs) -> bool:
    """Whether this call runs the C++ halves: float32 rows, and every activation stand-in in
    its decode mode (a one-token prompt runs them, and so the layer, as modules)."""
    return (
        h.dtype == torch.float32
        and h.is_contiguous()
        and embeddings[0].dtype == torch.float32
        and all(switch.decoding for switch in fused.switches)
    )


@dataclass
class LeanLayer:
    """One decoder layer's lean one-token forward (installed as the module's ``forward``)."""

    layer: nn.Module
    original: Callable[..., Any]
    attention_fn: Callable[..., Any]
    window: Callable[[nn.Module], int | None]
    mlp_class: str
    counters: dict[str, Any]  # the run's counters: ``lean_decode_layers`` counts lean calls
    # the hook's shortcut for plain dense decode (None: always the attention function)
    lane: Callable[..., torch.Tensor | None] | None = None
    _fused: FusedArgs | None = None
    _seen: tuple[nn.Module, ...] | None = None  # the modules ``_fused`` was built for

    @property
    def fused(self) -> FusedArgs | None:
        """The C++ halves' arguments for the layer's current modules (None: the Python ops)."""
        modules = _modules(self.layer)
        if modules != self._seen:
            self._fused, self._seen = _fused_args(self.layer, self.mlp_class), modules
        return self._fused

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeddings = kwargs.get("position_embeddings")
        attention = self.layer.self_attn
        held = None if cache is None else _layer_of(cache, attention.layer_idx)
        lean = (
            not args
            and hidden_states.shape[1] == 1
            and embeddings is not None
            and cache is not None
            and not torch.is_grad_enabled()
            and not self.layer.training
            and isinstance(held, (KVLayer, HeadGroupsLayer))
        )
        if not lean:
            return self.original(hidden_states, *args, **kwargs)
        self.counters[COUNTER] = self.counters.get(COUNTER, 0) + 1
        return self._forward(hidden_states, cache, held, embeddings, kwargs)

    def _forward(
        self, h: torch.Tensor, cache: Any, held: Any, embeddings: tuple, kwargs: dict
    ) -> torch.Tensor:
        """The layer's one-token forward; ``held`` is the cache's layer for it (updated in
        place by ``cache.update``)."""
        layer, attention = self.layer, self.layer.self_attn
        B = h.shape[0]
        D = attention.head_dim
        fused = self.fused
        if fused is not None and not _fused_takes(h, embeddings, fused):
            fused = None
        if fused is not None:
            self.counters[FUSED] = self.counters.get(FUSED, 0) + 1
            for counter in fused.counters:
                counter.calls += 1
            q, k, v = torch.ops.sparseattn.decode_qkv(h, fused.qkv.id, *embeddings, D)
        else:
            x = _rms_norm(h, layer.input_layernorm)
            q = _project(x, attention.q_proj).view(B, 1, -1, D).transpose(1, 2)
            k = _project(x, attention.k_proj).view(B, 1, -1, D).transpose(1, 2)
            v = _project(x, attention.v_proj).view(B, 1, -1, D).transpose(1, 2)
            cos, sin = embeddings
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, attention.layer_idx)
        out = None
        if self.lane is not None:
            out = self.lane(attention, q, k, v, held, self.window(attention))
            if out is not None:
                self.counters[LANE] = self.counters.get(LANE, 0) + 1
        if out is None:
            out, _ = self.attention_fn(
                attention,
                q,
                k,
                v,
                kwargs.get("attention_mask"),
                dropout=0.0,
                scaling=attention.scaling,
                sliding_window=self.window(attention),
            )
        if fused is not None:
            return torch.ops.sparseattn.decode_mlp(h, out, fused.mlp.id)
        h = h + _project(out.reshape(B, 1, -1), attention.o_proj)
        x = _rms_norm(h, layer.post_attention_layernorm)
        mlp = layer.mlp
        if type(mlp).__name__ != self.mlp_class:  # an activation method's stand-in
            return h + mlp(x)
        gated = mlp.act_fn(_project(x, mlp.gate_proj)) * _project(x, mlp.up_proj)
        return h + _project(gated, mlp.down_proj)


def _layer_of(cache: Any, index: int) -> Any:
    layers = getattr(cache, "layers", None)
    return layers[index] if layers is not None and index < len(layers) else None


@dataclass
class LeanInstall:
    """The layers given a lean forward; ``remove`` gives them their own back."""

    layers: list[nn.Module]

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers.clear()


def install_lean(
    layers: list[nn.Module],
    attention_fn: Callable[..., Any],
    counters: dict[str, Any],
    lane: Callable[..., torch.Tensor | None] | None = None,
) -> LeanInstall:
    """Give every supported layer of ``layers`` the lean decode forward (others unchanged);
    each lean call adds one to ``counters["lean_decode_layers"]``. ``lane(attention, q, k, v,
    cache_layer, window)`` may answer a call's attention first (None: ``attention_fn`` runs)."""
    done: list[nn.Module] = []
    for layer in layers:
        if not supports(layer) or "forward" in layer.__dict__:
            continue
        mlp_class, window = FAMILIES[type(layer).__name__]
        layer.forward = LeanLayer(
            layer, layer.forward, attention_fn, window, mlp_class, counters, lane
        )
        done.append(layer)
    return LeanInstall(done)

"""The lean decode step: a decoder layer's one-token forward as plain tensor ops.

At batch 1 a decode step of a small model is mostly fixed cost: SmolLM2-135M runs ~12 module
calls per layer (norms, four projections, the MLP and its three linears, the hub-kernel
wrappers around them), ~25 ops, and their Python dispatch, for 30 layers. Measured on the
2-core CPU at 16 cached tokens: 43.7 ms per step of which the linear layers are 25.7 ms.
``install_lean`` replaces, inside ``sparse_attention``, the forward of every decoder layer of
a supported family by one function that does the same arithmetic directly: RMSNorm (the
model's formula, op for op), the projections as ``F.linear`` on the modules' own weights (no
copies, no fused re-layout: the model's memory stays what it was), RoPE with the model's cos/sin, the cache write through the same
``update`` and the attention through the same registered function (so every decode method and
eviction policy runs unchanged), the gated MLP.

The lean forward runs only where it is exact: one token per row, a cache whose layer is
sparseattn's, no gradient, keyword arguments only, a module that is still the family's own
(an activation method's stand-in for the MLP or a projection is called as a module, so
activation sparsity composes). Anything else (prompts, other caches, training) calls the
layer's original forward. Families: Llama (SmolLM2), Mistral, Qwen2 (their attention layers
differ only in biases and in which sliding window they pass); Gemma 3's layers (extra norms,
q/k norms, scaled embeddings) keep their own forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVLayer

COUNTER = "lean_decode_layers"


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


@dataclass
class LeanLayer:
    """One decoder layer's lean one-token forward (installed as the module's ``forward``)."""

    layer: nn.Module
    original: Callable[..., Any]
    attention_fn: Callable[..., Any]
    window: Callable[[nn.Module], int | None]
    mlp_class: str
    counters: dict[str, Any]  # the run's counters: ``lean_decode_layers`` counts lean calls

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeddings = kwargs.get("position_embeddings")
        attention = self.layer.self_attn
        lean = (
            not args
            and hidden_states.shape[1] == 1
            and embeddings is not None
            and cache is not None
            and not torch.is_grad_enabled()
            and not self.layer.training
            and isinstance(_layer_of(cache, attention.layer_idx), KVLayer)
        )
        if not lean:
            return self.original(hidden_states, *args, **kwargs)
        self.counters[COUNTER] = self.counters.get(COUNTER, 0) + 1
        return self._forward(hidden_states, cache, embeddings, kwargs)

    def _forward(
        self, h: torch.Tensor, cache: Any, embeddings: tuple, kwargs: dict
    ) -> torch.Tensor:
        layer, attention = self.layer, self.layer.self_attn
        B = h.shape[0]
        D = attention.head_dim
        x = _rms_norm(h, layer.input_layernorm)
        q = _project(x, attention.q_proj).view(B, 1, -1, D).transpose(1, 2)
        k = _project(x, attention.k_proj).view(B, 1, -1, D).transpose(1, 2)
        v = _project(x, attention.v_proj).view(B, 1, -1, D).transpose(1, 2)
        cos, sin = embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, attention.layer_idx)
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
    layers: list[nn.Module], attention_fn: Callable[..., Any], counters: dict[str, Any]
) -> LeanInstall:
    """Give every supported layer of ``layers`` the lean decode forward (others unchanged);
    each lean call adds one to ``counters["lean_decode_layers"]``."""
    done: list[nn.Module] = []
    for layer in layers:
        if not supports(layer) or "forward" in layer.__dict__:
            continue
        mlp_class, window = FAMILIES[type(layer).__name__]
        layer.forward = LeanLayer(layer, layer.forward, attention_fn, window, mlp_class, counters)
        done.append(layer)
    return LeanInstall(done)

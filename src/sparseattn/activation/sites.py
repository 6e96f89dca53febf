"""Where activation sparsity applies: the decoder layers, their linear layers and gated MLPs."""

from __future__ import annotations

from torch import nn

from ..errors import UsageError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (``get_decoder().layers``).

    Raises:
        UsageError: the model has no such list.
    """
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UsageError(
            f"activation sparsity needs the decoder layers as `get_decoder().layers`; "
            f"{type(model).__name__} has none"
        )
    return list(layers)


def linear_sites(layer: nn.Module) -> dict[str, nn.Linear]:
    """{name in the layer: module} of every nn.Linear of a decoder layer, in module order
    (``self_attn.q_proj`` ... ``mlp.down_proj``)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def parent_of(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the submodule ``name`` of ``layer``."""
    path, _, attribute = name.rpartition(".")
    return (layer.get_submodule(path) if path else layer), attribute


def check_plain(module: nn.Module, where: str) -> None:
    """Refuse a module with hooks of its own: a stand-in would silently skip them."""
    hooked = module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
    if hooked:
        raise UsageError(
            f"{where} ({type(module).__name__}) has forward hooks of its own (device offloading, "
            "adapters ...); activation sparsity replaces the module at decode and would skip them"
        )


def gated_mlp(layer: nn.Module, layer_idx: int) -> nn.Module:
    """The layer's gated MLP (``mlp`` with gate_proj, up_proj, down_proj as nn.Linear and
    act_fn): down(act(gate(x)) * up(x)), the shape CATS sparsifies.

    Raises:
        UsageError: naming what the layer's MLP lacks.
    """
    mlp = getattr(layer, "mlp", None)
    parts = ("gate_proj", "up_proj", "down_proj")
    missing = [p for p in parts if not isinstance(getattr(mlp, p, None), nn.Linear)]
    if mlp is None or missing or not callable(getattr(mlp, "act_fn", None)):
        kind = type(mlp).__name__ if mlp is not None else "no mlp"
        lacks = ", ".join(missing) or "act_fn"
        raise UsageError(
            f"cats needs a gated MLP (mlp.gate_proj, up_proj, down_proj as nn.Linear and "
            f"act_fn); layer {layer_idx} has {kind} without {lacks}"
        )
    return mlp

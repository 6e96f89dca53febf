"""Put an activation method's stand-in modules into a model, and take them out exactly.

``install`` swaps the modules a method returns into every decoder layer and registers one
forward pre-hook on the decoder that sets the ``DecodeSwitch`` before each forward (and a
forward hook that clears it after): a decode
step is one token per row over a cache that already holds tokens (a prompt, even of one
token, runs the original modules). ``Installed.remove`` puts every original module back (the
same objects) and removes the hooks; the re-laid-out weights go with the stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..compat import passed_cache
from .base import ActivationMethod
from .modules import DecodeSwitch
from .sites import decoder_layers
from .stats import ActivationStats, model_weight_bytes


@dataclass
class Installed:
    """What ``install`` changed: swapped modules (parent, attribute, original) and the hooks."""

    stats: ActivationStats
    swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        """Put every original module back, last swapped first, and remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for parent, attribute, original in reversed(self.swaps):
            setattr(parent, attribute, original)
        self.swaps.clear()


def _tokens_per_row(args: tuple, kwargs: dict[str, Any]) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if value is not None:
            return value.shape[1]
    return args[0].shape[1] if args and hasattr(args[0], "shape") else None


def install(model: nn.Module, decoder: nn.Module, method: ActivationMethod) -> Installed:
    """Swap ``method``'s stand-ins into ``model`` (its profile bound already).

    Args:
        model: The causal LM.
        decoder: The module whose forward takes the cache (the base model).
        method: A bound activation method.

    Returns:
        The installation, whose ``remove`` restores the model and whose ``stats`` count.
    """
    stats = ActivationStats(method.label, model_weight_bytes(model))
    switch = DecodeSwitch()
    installed = Installed(stats)
    try:
        for index, layer in enumerate(decoder_layers(model)):
            for parent, attribute, stand_in in method.wrap_layer(index, layer, switch, stats):
                installed.swaps.append((parent, attribute, getattr(parent, attribute)))
                setattr(parent, attribute, stand_in)
    except BaseException:
        installed.remove()
        raise

    def set_switch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        _, cache = passed_cache(kwargs)
        one = _tokens_per_row(args, kwargs) == 1
        switch.decoding = one and cache is not None and cache.get_seq_length() > 0
        if switch.decoding:
            stats.steps += 1

    def clear_switch(module: nn.Module, args: tuple, output: Any) -> None:
        switch.decoding = False  # a layer called on its own later runs the original modules

    installed.handles += [
        decoder.register_forward_pre_hook(set_switch, with_kwargs=True),
        decoder.register_forward_hook(clear_switch),
    ]
    return installed

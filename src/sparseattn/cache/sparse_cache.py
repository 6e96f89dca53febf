"""``SparseCache``: a transformers Cache whose layers store only what they keep."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import UsageError
from .groups import HeadGroupsLayer
from .layers import KVLayer
from .ring import RingLayer
from .storage import state_nbytes

CacheLayer = KVLayer | HeadGroupsLayer
OUR_LAYERS = (KVLayer, HeadGroupsLayer)


class LayerFactory(Protocol):
    """What builds the cache layer of a full-attention layer (an eviction policy)."""

    name: str
    needs_queries: bool

    def make_layer(self, model: nn.Module, layer_idx: int, page_size: int) -> CacheLayer: ...


def build_layers(
    model: nn.Module, policy: LayerFactory | None = None, page_size: int = 16
) -> list[CacheLayer]:
    """One cache layer per decoder layer, mirroring the layer kinds transformers would build.

    Sliding-window layers keep their own window (a bounded layer with no sink); full-attention
    layers get the policy's layer (a full layer without a policy).

    Raises:
        ValueError: a layer kind we cannot hold (linear attention, KV sharing ...), named.
    """
    config = model.config.get_text_config(decoder=True)
    layers: list[CacheLayer] = []
    for i, template in enumerate(DynamicCache(config=config).layers):
        if isinstance(template, DynamicSlidingWindowLayer):
            layers.append(
                RingLayer(window=template.sliding_window, sliding=True, page_size=page_size)
            )
        elif type(template) is DynamicLayer:
            if policy is None:
                layers.append(KVLayer(page_size=page_size))
                continue
            layer = policy.make_layer(model, i, page_size)
            layer.origin = (policy.name, tuple(sorted(policy.knobs().items())))
            layers.append(layer)
        else:
            raise UsageError(
                f"sparseattn's cache cannot hold layer {i} of {type(model).__name__} "
                f"({type(template).__name__}); supported: full and sliding-window attention layers"
            )
    return layers


class SparseCache(Cache):
    """A KV cache that really forgets: each layer holds only the tokens it keeps.

    Built by ``sparse_attention`` for every forward or ``generate`` that needs a cache (the user
    never has to build one); ``SparseCache(model)`` builds one by hand (full layers, the model's
    sliding windows kept). With capacity >= length every layer holds exactly what
    ``DynamicCache`` holds.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        policy: LayerFactory | None = None,
        page_size: int = 16,
        layers: list[CacheLayer] | None = None,
    ) -> None:
        if layers is None:
            if model is None:
                raise UsageError("SparseCache needs the model (or ready-made layers)")
            layers = build_layers(model, policy, page_size)
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes allocated by every layer (KV storage with its headroom, explicit positions,
        decode-method state) and the state its layers share."""
        return cache_nbytes(self)

    def held_nbytes(self) -> int:
        """Bytes of the keys and values of the tokens held, nothing else."""
        return cache_held_bytes(self)

    def kv_nbytes(self) -> int:
        """Bytes of key/value storage alone."""
        return cache_nbytes(self, kv_only=True)

    def layer_nbytes(self) -> list[int]:
        return [layer_nbytes(layer) for layer in self.layers]


def layer_nbytes(layer: Any, kv_only: bool = False) -> int:
    """Bytes a cache layer holds, ours or transformers'."""
    if isinstance(layer, OUR_LAYERS):
        return layer.kv_nbytes() if kv_only else layer.nbytes()
    total = 0
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    return total


SHARED_STATE = "sparseattn_shared"  # attribute of a cache: decode state its layers share


def shared_state(cache: Cache) -> dict:
    """The decode state shared by the layers of ``cache`` (a selection one layer makes for the
    others), kept on the cache so it lives and dies with it and counts in its bytes."""
    shared = getattr(cache, SHARED_STATE, None)
    if shared is None:
        shared = {}
        setattr(cache, SHARED_STATE, shared)
    return shared


def cache_nbytes(cache: Cache | None, kv_only: bool = False) -> int:
    """Bytes allocated by every layer of ``cache`` and its shared state (0 for None).

    With ``kv_only`` the key/value storage alone (allocated slots, headroom included).
    """
    if cache is None:
        return 0
    total = sum(layer_nbytes(layer, kv_only) for layer in cache.layers)
    if not kv_only:
        total += state_nbytes(getattr(cache, SHARED_STATE, None) or {})
    return total


def cache_held_bytes(cache: Cache | None) -> int:
    """Bytes of the keys and values of the tokens ``cache`` holds (0 for None): what a cache
    sized exactly to its content would take."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        if isinstance(layer, OUR_LAYERS):
            total += layer.held_nbytes()
        else:
            total += layer_nbytes(layer, kv_only=True)
    return total


def is_empty(cache: Cache) -> bool:
    return all(getattr(layer, "get_seq_length", lambda: 0)() == 0 for layer in cache.layers)


def adopt(cache: Cache, layers: list[CacheLayer], padding: torch.Tensor | None = None) -> None:
    """Give ``cache`` our layers in place, keeping what it already holds.

    The object the caller passed (a ``DynamicCache`` built by ``generate`` or by the user, or a
    ``SparseCache`` filled under another setting) stays the one that is filled: nothing is
    silently bypassed. Tokens it already holds are moved into the new layers at their
    positions, so a bounded layer compacts them as if it had seen the prompt.

    Args:
        cache: The cache to take over.
        layers: Our layers, one per decoder layer.
        padding: (B, total) bool 2-D attention mask of the current forward (its first columns
            cover the held tokens), or None when nothing is padded.

    Raises:
        ValueError: the cache holds a layer kind we cannot take over (named).
    """
    old = list(cache.layers)
    for i, layer in enumerate(layers):
        if i >= len(old) or not getattr(old[i], "is_initialized", False):
            continue
        keys, values, positions, seen = _held(old[i], i)
        if keys is None or keys.shape[2] == 0:
            continue
        layer.seen = seen - keys.shape[2]  # position of the first held token
        layer.update(keys, values)
        if padding is not None and not bool(padding.all()):
            first = layer.seen - keys.shape[2]
            layer.mark_padding(padding[:, first : first + layer.call_view()[0].shape[2]])
        layer.finish_call()
    cache.layers = list(layers)
    cache.layer_class_to_replicate = None


def _held(layer: Any, index: int):
    """Keys, values, explicit positions (None if contiguous) and tokens seen of a held layer."""
    if isinstance(layer, HeadGroupsLayer):
        raise UsageError(
            f"cache layer {index} is split into head groups under another setting; pass an "
            "empty cache (or none) to use it under this one"
        )
    if isinstance(layer, KVLayer):
        keys, values, positions = layer.call_view()
        if positions is not None:
            raise UsageError(
                f"cache layer {index} already evicted tokens under another setting; a cache "
                "can be taken over only while it holds a contiguous run of tokens"
            )
        return keys, values, None, layer.seen
    if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
        raise UsageError(
            f"cannot take over cache layer {index} ({type(layer).__name__}) filled outside "
            "sparse_attention; pass an empty cache or none"
        )
    return layer.keys, layer.values, None, layer.get_seq_length()

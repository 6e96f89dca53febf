"""Cache binding: every forward inside ``sparse_attention`` runs on sparseattn's cache layers,
whatever cache the caller passed (or none)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..cache import OUR_LAYERS, CacheLayer, SparseCache, adopt, build_layers, is_empty
from ..compat import passed_cache
from ..errors import UsageError


class CacheBinding:
    """The cache half of ``SparsePlan`` (which holds ``model``, ``evict``, ``decode``,
    ``options``, ``stats``, ``cache`` and ``_prepared``): give each forward our cache, adopt a
    caller's, find the layer a call belongs to."""

    def make_layers(self) -> list[CacheLayer]:
        return build_layers(self.model, self.evict, self.options.page_size)

    def bind_cache(self, kwargs: dict[str, Any], config: Any, argument: str) -> None:
        """Forward pre-hook of the decoder: give every forward that caches our cache.

        No cache and ``use_cache``: a new ``SparseCache``. A ``DynamicCache`` (the one
        ``generate`` builds, or the user's): our layers in place, keeping what it holds. A
        ``SparseCache``: used. Any other cache: used as it is when nothing needs our layers,
        else refused with an error naming it. ``argument`` is the keyword the decoder's forward
        takes its cache under when the caller passed none (``cache`` or ``past_key_values``).
        """
        passed, cache = passed_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(config, "use_cache", True)
        if cache is None and use_cache:
            cache = SparseCache(layers=self.make_layers())
            kwargs[passed or argument] = cache
            self._prepared.add(cache)
        elif cache is not None and cache not in self._prepared:
            self._prepare(cache, kwargs.get("attention_mask"))
        self.cache = cache
        self.stats.bind_cache(cache)

    def _prepare(self, cache: Cache, attention_mask: torch.Tensor | None) -> None:
        ours = all(isinstance(layer, OUR_LAYERS) for layer in cache.layers) and cache.layers
        if not (ours or isinstance(cache, DynamicCache)):
            if self.evict is not None or getattr(self.decode, "needs_cache_state", False):
                raise UsageError(
                    f"{type(cache).__name__} cannot forget or keep decode state; "
                    f"evict={self.evict.name if self.evict else None!r} and decode="
                    f"{self.decode.name!r} need sparseattn's cache: pass no cache (or a "
                    "DynamicCache / SparseCache) so the library supplies its own"
                )
            self._prepared.add(cache)
            return
        scores_queries = self.evict is not None and self.evict.needs_queries
        if scores_queries and not is_empty(cache) and not self._built_here(cache):
            raise UsageError(
                f"eviction policy {self.evict.name!r} scores the prompt with its queries, "
                "but this cache was filled outside this sparse_attention block, so the "
                "queries are gone; pass an empty cache (or none) and prefill inside it"
            )
        if is_empty(cache) or not self._built_here(cache):
            adopt(cache, self.make_layers(), attention_mask)
        self._prepared.add(cache)

    def _built_here(self, cache: Cache) -> bool:
        wanted = [layer.origin for layer in self.make_layers()]
        return [getattr(layer, "origin", None) for layer in cache.layers] == wanted

    def cache_layer(self, layer_idx: int, key: torch.Tensor) -> CacheLayer | None:
        """Our cache layer whose update produced ``key`` in this forward, or None."""
        if self.cache is None or layer_idx >= len(self.cache.layers):
            return None
        layer = self.cache.layers[layer_idx]
        view = layer.call_view() if isinstance(layer, OUR_LAYERS) else None
        return layer if view is not None and view[0] is key else None

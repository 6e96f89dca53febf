"""Storage shared by every cache layer kind: slot arithmetic, buffers, gathered copies, bytes.

A layer keeps keys and values in preallocated buffers ``(B, Hkv, capacity, D)`` written in place
(gpt-fast style); what differs between the kinds is which slots they write and when they
compact. The helpers here know nothing of those rules.
"""

from __future__ import annotations

from typing import Any

import torch

GROWTH_SHARE = 16  # a full layer that runs out of room grows by 1/16 of what it needs (>= a page)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def grown_capacity(needed: int, page_size: int) -> int:
    """Slots to allocate when a layer must hold ``needed``: the headroom is proportional to what
    it holds (1/16, at least one page), so appends copy the layer O(log n) times and a long
    prompt never carries a fixed block of spare slots per layer."""
    return round_up(needed + max(page_size, needed // GROWTH_SHARE), page_size)


def allocate(
    B: int, H: int, D: int, Dv: int, capacity: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed key and value buffers of ``capacity`` slots: (B, H, capacity, D) and (.., Dv)."""
    keys = torch.zeros(B, H, capacity, D, dtype=dtype, device=device)
    return keys, torch.zeros(B, H, capacity, Dv, dtype=dtype, device=device)


def gather_slots(
    keys: torch.Tensor, values: torch.Tensor, take: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New buffers holding the slots ``take`` of ``keys`` / ``values`` (a compaction's copy).

    Args:
        keys: (B, H, N, D) the keys a call holds; values (B, H, N, Dv).
        take: (B, 1 or H, C) slot indices per row (and head).

    Returns:
        (B, H, C, D) and (B, H, C, Dv): the old buffers are freed once nothing else holds them.
    """
    B, H, _, D = keys.shape
    index = take[..., None].expand(B, H, take.shape[-1], D)
    kept_k = keys.gather(2, index)
    index = take[..., None].expand(B, H, take.shape[-1], values.shape[-1])
    return kept_k, values.gather(2, index)


def state_nbytes(state: Any, seen: set[int] | None = None) -> int:
    """Bytes held by decode-method state: tensors, faiss indexes, and the containers and
    objects holding them (each object counted once)."""
    seen = set() if seen is None else seen
    if id(state) in seen:
        return 0
    seen.add(id(state))
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if type(state).__module__.startswith("faiss"):
        return faiss_nbytes(state)
    if isinstance(state, dict):
        return sum(state_nbytes(value, seen) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(value, seen) for value in state)
    if hasattr(state, "__dict__"):
        return state_nbytes(vars(state), seen)
    return 0


def faiss_nbytes(index: Any) -> int:
    """Bytes of a faiss index without serialising it: stored vectors (fp32), an id map's ids,
    an HNSW graph's neighbour lists, offsets and levels."""
    import faiss

    total = 0
    if hasattr(index, "id_map"):  # IndexIDMap: int64 ids around an inner index
        total += index.id_map.size() * 8
        index = faiss.downcast_index(index.index)
    total += index.ntotal * index.d * 4
    graph = getattr(index, "hnsw", None)
    if graph is not None:
        total += graph.neighbors.size() * 4 + graph.offsets.size() * 8 + graph.levels.size() * 4
    return total

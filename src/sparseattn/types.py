"""Core value types shared by methods, backends and the transformers integration.

Shape letters: B batch, Hq query heads, Hkv key/value heads, Lq query length, Lk key length,
D head dim, b block size, nQ = ceil(Lq / b), nK = ceil(Lk / b).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Phase(str, Enum):
    """Which part of inference an attention call belongs to."""

    PREFILL = "prefill"  # first chunk of the prompt: query positions start at 0
    CHUNKED_PREFILL = "chunked_prefill"  # a later prompt chunk: q_len > 1 with a KV prefix
    DECODE = "decode"  # one new token attends to the cache

    @property
    def is_prefill(self) -> bool:
        return self is not Phase.DECODE


@dataclass(frozen=True)
class AttentionContext:
    """Everything a method or backend needs to know about one attention call.

    Positions are absolute cache indices: query i sits at ``q_offset + i``, key j at
    ``kv_offset + j``. A key is visible to a query when it is not in the future, lies inside the
    layer's own sliding window (if any), and is not padding.

    Attributes:
        layer_idx: Index of the decoder layer.
        phase: Prefill, chunked prefill or decode.
        batch: B.
        q_len: Lq.
        kv_len: Lk.
        q_offset: Absolute position of the first query.
        kv_offset: Absolute position of the first key (non-zero for sliding-window caches).
        num_q_heads: Hq.
        num_kv_heads: Hkv.
        scaling: Softmax scale applied to q.k.
        sliding_window: The layer's own window (query sees keys with q - k < window) or None.
        softcap: Logit soft-capping (Gemma 2) or None.
        key_valid: (B, Lk) bool, False where the key is padding; None when nothing is padded.
        device: Device of the call's tensors.
    """

    layer_idx: int
    phase: Phase
    batch: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_offset: int
    num_q_heads: int
    num_kv_heads: int
    scaling: float
    sliding_window: int | None = None
    softcap: float | None = None
    key_valid: torch.Tensor | None = field(default=None, repr=False)
    device: torch.device = field(default=torch.device("cpu"), repr=False)

    @property
    def groups(self) -> int:
        """GQA group size g = Hq / Hkv."""
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class BlockSelection:
    """Which (query block, key block) tiles to compute.

    Attributes:
        mask: (B, Hq, nQ, nK) bool; True = compute this tile. Block (i, j) covers queries
            [i*b, (i+1)*b) of the query tensor and keys [j*b, (j+1)*b) of the key tensor.
            Tiles are further restricted at token level by causality, the layer's window and
            padding, so a selection never makes a future or padded key visible.
        block_size: b.
    """

    mask: torch.Tensor
    block_size: int

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.dim() != 4:
            raise ValueError(
                f"BlockSelection.mask must be a 4-D bool tensor (B, H, nQ, nK), got "
                f"dtype={self.mask.dtype} shape={tuple(self.mask.shape)}"
            )


@dataclass(frozen=True)
class KVSelection:
    """Which cached tokens each query head attends to during decode.

    Attributes:
        indices: (B, Hq, K) long, key indices into the key tensor (padded entries arbitrary).
        valid: (B, Hq, K) bool, False for padded entries (rows hold different counts).
    """

    indices: torch.Tensor
    valid: torch.Tensor

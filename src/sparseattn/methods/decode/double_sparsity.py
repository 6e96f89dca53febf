"""Double Sparsity: token selection scored on a label cache of each head's calibrated channels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import UsageError
from ...profiles import Profile, bind_profile, open_profile, shipped_profiles
from ...registry import register_method
from ...types import AttentionContext, DecodeView, Phase, TokenSelection
from ..base import Method, knob
from .tokens import check_budget, forced_tokens, group_vote, top_tokens

_BIG = 2**31 - 1
_GROWTH = 256  # label slots a full cache's label buffer grows by


@dataclass
class LabelCache:
    """The label cache of one cache layer: K on the profile's channels, for every slot.

    Attributes:
        buffer: (B, Hkv, capacity, r) labels in the keys' dtype; slot j holds key j's channels
            (slots at or beyond the layer's held keys are spare room).
        writes: The layer's update count the labels include.
    """

    buffer: torch.Tensor
    writes: int


def labels_of(keys: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S, D) keys and (Hkv, r) channel indices -> (B, Hkv, S, r) labels."""
    B, H, S, _ = keys.shape
    return keys.gather(3, channels[None, :, None, :].expand(B, H, S, -1))


def _room(slots: int) -> int:
    """Label slots to allocate for ``slots`` held keys: whole steps of _GROWTH, one spare."""
    return -(-(slots + 1) // _GROWTH) * _GROWTH


def shipped_channel_profiles() -> list[str]:
    """Names of the shipped channels profiles, e.g. 'smollm2-135m-channels'."""
    return [name for name in shipped_profiles() if name.endswith("-channels")]


@register_method
@dataclass
class DoubleSparsity(Method):
    """Double Sparsity (Yang et al., 2024, arXiv:2408.07092): approximate q.k on a few
    calibrated channels picks the tokens, exact attention reads only them.

    Offline (``sparseattn profile --kind channels``) every KV head's channels are ranked by
    importance, the mean of |q_d k_d| over the causal (query, key) pairs of calibration inputs (RoPE
    applied, as attention sees them) and over the query heads of its group. A label cache holds each
    slot's key on the ``channels`` top-ranked channels of its KV head, (B, Hkv, S, r); it lives with
    the cache layer and is kept in step incrementally (only the slots the latest update wrote, a
    ring cache's overwritten slot and re-rotated sinks included; rebuilt when an update was missed,
    e.g. after a compaction). At decode every query head scores every slot on those channels,
    q[ch].label, scaled by the model's own 1/sqrt(D); each KV head reads the ``budget`` tokens its
    query heads vote for (each head's softmax, summed over the group, as Quest and TokenSelect do),
    the sink, the last ``window`` tokens and the current token always among them. Choices where the
    paper is open: channels are chosen per KV head (the label cache is per KV head; the paper has no
    GQA), the importance measure above, the soft vote, no logit soft-capping on the approximate
    scores, and no offloading of the cache to the host. ``profile='auto'`` uses the shipped profile
    of the hooked model; other models need one calibrated (a ``.json`` path).
    """

    name: ClassVar[str] = "double_sparsity"
    paper: ClassVar[str] = "Post-Training Sparse Attention with Double Sparsity (arXiv:2408.07092)"
    phases: ClassVar = frozenset({Phase.DECODE})
    dense_limit: ClassVar[dict] = {"budget": _BIG}
    default_grid: ClassVar[dict] = {"budget": [256, 512, 1024]}

    channels: int = knob(16, low=1, high=1024, help="channels r per KV head in the label cache")
    budget: int = knob(1024, low=1, high=_BIG, help="tokens read per step per KV head")
    sink: int = knob(0, low=0, high=_BIG, help="first tokens always read")
    window: int = knob(0, low=0, high=_BIG, help="most recent tokens always read")
    profile: str = knob(
        "auto",
        help="channel ranking: 'auto' (the shipped profile of the hooked model), a shipped "
        "profile name, or a .json file written by `sparseattn profile --kind channels`",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.name, self.budget, self.sink, self.window)
        self._index: dict[tuple[int, str], torch.Tensor] = {}  # (layer, device) -> (Hkv, r)
        self._profile = self._set_profile(open_profile(self._checked_name(), "channels"))

    def bind(self, config: Any) -> None:
        self._profile = self._set_profile(
            bind_profile(self._profile, self.profile, "channels", config)
        )

    @property
    def state_key(self) -> str:
        return f"{self.name}:{self.channels}"

    def _checked_name(self) -> str:
        """The profile knob, if it names 'auto', a shipped channels profile or a .json file."""
        name, shipped = self.profile, shipped_channel_profiles()
        if isinstance(name, str) and (
            name in ("auto", *shipped) or name.endswith(".json") or Path(name).is_file()
        ):
            return name
        raise UsageError(
            f"{self.name}: knob profile={name!r} is not a channels profile; allowed: 'auto', "
            f"{', '.join(map(repr, shipped)) or '(none shipped)'}, or a .json file written by "
            "`sparseattn profile --kind channels`"
        )

    def _set_profile(self, profile: Profile | None) -> Profile | None:
        """Check ``channels`` against the profile's head size and forget cached indices."""
        self._index.clear()
        if profile is not None and self.channels > profile.fingerprint["head_dim"]:
            head_dim = profile.fingerprint["head_dim"]
            raise UsageError(
                f"{self.name}: knob channels={self.channels} exceeds the head size of profile "
                f"{profile.source}; allowed: 1..{head_dim}"
            )
        return profile

    def layer_channels(self, ctx: AttentionContext, head_dim: int) -> torch.Tensor:
        """(Hkv, r) long: the channels each KV head of this layer keeps in its labels."""
        key = (ctx.layer_idx, str(ctx.device))
        if key not in self._index:
            if self._profile is None:
                raise UsageError(
                    f"{self.name} with profile='auto' needs the model: run it through "
                    "sparse_attention(model, ...), or pass profile=FILE.json"
                )
            if head_dim != self._profile.fingerprint["head_dim"]:
                raise UsageError(
                    f"profile {self._profile.source} ranks {self._profile.fingerprint['head_dim']}"
                    f" channels per head, but the call has head size {head_dim}: it was made for "
                    "another model"
                )
            ranking = self._profile.layer(self._profile.levels[0], ctx.layer_idx, ctx.num_kv_heads)
            top = [row[: self.channels] for row in ranking]
            self._index[key] = torch.tensor(top, dtype=torch.long, device=ctx.device)
        return self._index[key]

    def labels(self, view: DecodeView, channels: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, Lk, r) this layer's label cache, updated with the latest write (rebuilt if
        an update was missed)."""
        keys = view.keys  # (B, Hkv, Lk, D)
        B, H, S, _ = keys.shape
        state: LabelCache | None = view.state.get(self.state_key)
        start, stop = view.last_write
        fresh = (
            state is None
            or state.writes != view.writes - 1
            or stop <= start
            or state.buffer.shape[:2] != (B, H)
        )
        if fresh:
            view.count(f"{self.name}_label_rebuilds", 1.0)
            buffer = keys.new_empty(B, H, _room(S), channels.shape[1])
            buffer[:, :, :S] = labels_of(keys, channels)
            state = LabelCache(buffer, view.writes)
        else:
            if stop > state.buffer.shape[2]:  # a full cache outgrew the buffer: grow it
                grown = keys.new_empty(B, H, _room(stop), channels.shape[1])
                grown[:, :, :start] = state.buffer[:, :, :start]
                state.buffer = grown
            state.buffer[:, :, start:stop] = labels_of(keys[:, :, start:stop], channels)
            first, last = view.rewritten
            if last > first:  # keys changed in place (re-rotated sinks)
                state.buffer[:, :, first:last] = labels_of(keys[:, :, first:last], channels)
            state.writes = view.writes
        view.state[self.state_key] = state
        return state.buffer[:, :, :S]

    def select_decode(
        self, q: torch.Tensor, view: DecodeView, ctx: AttentionContext
    ) -> TokenSelection | None:
        if self.budget >= ctx.kv_len and self.dense_when_covered:
            return None  # the budget covers the cache: dense
        B, Hq, _, D = q.shape
        channels = self.layer_channels(ctx, D)  # (Hkv, r)
        labels = self.labels(view, channels)  # (B, Hkv, Lk, r)
        rows = q.reshape(B, ctx.num_kv_heads, ctx.groups, D)  # (B, Hkv, g, D)
        rows = rows.gather(3, channels[None, :, None, :].expand(B, -1, ctx.groups, -1))
        scores = torch.matmul(rows.float(), labels.float().transpose(-1, -2))  # (B, Hkv, g, Lk)
        votes = group_vote(scores, ctx)  # (B, Hkv, Lk)
        return top_tokens(votes, forced_tokens(ctx, self.sink, self.window), self.budget, ctx)

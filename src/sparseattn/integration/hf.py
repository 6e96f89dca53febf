"""The one hook into transformers: an attention function and a mask function, registered once.

Inside ``sparse_attention(model, ...)`` every config of the model names ``"sparseattn"`` as its
attention implementation; transformers then builds our lightweight mask (positions and padding,
never an L x L tensor) and calls ``sparse_attention_forward`` from each attention layer. Leaving
the context puts the previous implementation names back; nothing else on the model changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.masking_utils import AttentionMaskInterface

from ..activation import ActivationMethod, build_activation
from ..activation import install as install_activation
from ..activation.sites import decoder_layers
from ..compat import cache_argument
from ..errors import UsageError
from ..methods.base import Method
from ..methods.eviction import EvictionPolicy
from ..registry import build_method, build_policy
from ..types import Phase
from .decode import dense_lane
from .execute import CallInput, run_layer
from .options import HookOptions
from .plan import SparsePlan
from .stats import RunStats
from .step import install_lean

IMPLEMENTATION = "sparseattn"

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, SparsePlan] = weakref.WeakKeyDictionary()
_LAST_STATS: weakref.WeakKeyDictionary[nn.Module, RunStats] = weakref.WeakKeyDictionary()


class VisibilityInfo:
    """What our mask function hands the attention layers instead of a 4-D mask.

    Attributes:
        q_offset: Absolute position of the first query (tokens seen before this forward).
        kv_offset: Absolute position of the first key for caches that hold a contiguous run.
        padding: (B, total) bool 2-D attention mask over absolute positions, or None.
        local_size: The sliding window transformers built this mask for, if any.
    """

    __slots__ = ("_padding_absent", "_starts", "kv_offset", "local_size", "padding", "q_offset")

    def __init__(
        self,
        q_offset: int,
        kv_offset: int,
        padding: torch.Tensor | None = None,
        local_size: int | None = None,
    ) -> None:
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.padding, self.local_size = padding, local_size
        self._padding_absent: bool | None = None
        self._starts: torch.Tensor | None = None

    def row_start(self) -> torch.Tensor | None:
        """(B,) long absolute position of each row's first valid token (where its sink is),
        computed on the device once per mask (per forward), or None without a mask."""
        if self.padding is None:
            return None
        if self._starts is None:
            self._starts = self.padding.to(torch.uint8).argmax(-1)  # first True per row
        return self._starts

    def padding_absent(self, allow_sync: bool) -> bool:
        """True when the mask is known to pad nothing; checked once, and only where a host
        sync is allowed (prefill). Decode steps never look."""
        if self.padding is None:
            return True
        if self._padding_absent is None and allow_sync:
            self._padding_absent = bool(self.padding.all())
        return bool(self._padding_absent)


def check_mask_function(
    mask_function: Any, batch: int, q_offset: int, q_length: int, local_size: int | None, device
) -> None:
    """Refuse a mask function that is not causal (+ the layer's sliding window).

    transformers hands every mask implementation its mask function; ours computes visibility
    from positions (causal, window, padding), so anything else (chunked attention, packed
    sequences, bidirectional or blockwise masks) would silently become causal. The function is
    probed on the first, middle and last query rows of the call against every earlier key.

    Raises:
        ValueError: naming the mask function, when it differs from causal (+ window).
    """
    if mask_function is None:
        return
    last = q_offset + q_length - 1
    rows = torch.tensor(sorted({q_offset, q_offset + q_length // 2, last}), device=device)
    b = torch.arange(batch, device=device)[:, None, None]
    q = rows[None, :, None]
    kv = torch.arange(last + 1, device=device)[None, None, :]
    head = torch.zeros((), dtype=torch.long, device=device)
    got = torch.as_tensor(mask_function(b, head, q, kv), device=device).expand(batch, -1, -1)
    want = kv <= q
    if local_size is not None:
        want = want & (q - kv < local_size)
    if not torch.equal(got, want.expand(batch, -1, -1)):
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        kind = f"causal with a sliding window of {local_size}" if local_size else "causal"
        raise UsageError(
            f"sparseattn supports causal attention (with the model's sliding windows); this "
            f"model's mask function {name} is not {kind} (chunked attention, packed sequences, "
            "bidirectional or blockwise masks are refused rather than silently made causal)"
        )


def sparse_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int = 0,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> VisibilityInfo:
    """Mask function for transformers' AttentionMaskInterface: positions and padding only.

    Prompt chunks probe transformers' mask function (``check_mask_function``); decode steps do
    no work that reads the device. transformers before 5.24 pass ``cache_position`` (the query
    positions) instead of ``q_length`` and ``q_offset``; its first entry is read once per
    forward there (a host read those versions impose).
    """
    if q_length is None:  # transformers < 5.24
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    if isinstance(q_offset, torch.Tensor):  # static caches hand a tensor (one sync, their choice)
        q_offset = int(q_offset)
    device = attention_mask.device if attention_mask is not None else kwargs.get("device", "cpu")
    if q_length > 1:
        check_mask_function(mask_function, batch_size, q_offset, q_length, local_size, device)
    padding = None
    if attention_mask is not None:
        padding = attention_mask.bool()
        total = kv_offset + kv_length
        if padding.shape[-1] < total:  # static caches: slots past the mask count as valid
            padding = nn.functional.pad(padding, (0, total - padding.shape[-1]), value=True)
    return VisibilityInfo(q_offset, int(kv_offset), padding, local_size)


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: VisibilityInfo | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for transformers' AttentionInterface.

    Args:
        module: The attention layer (provides ``layer_idx``).
        query: (B, Hq, Lq, D).
        key: (B, Hkv, Lk, D), what this layer's cache holds plus the new keys.
        value: (B, Hkv, Lk, D).
        attention_mask: A VisibilityInfo from ``sparse_mask``.

    Returns:
        (B, Lq, Hq, D) output and no attention weights.
    """
    plan = _plan_of(module)
    if isinstance(attention_mask, torch.Tensor):
        raise UsageError(
            "sparseattn received a ready-made 4-D attention mask; pass a 2-D padding mask "
            "(attention_mask of shape (batch, length)) so transformers builds our mask instead"
        )
    if attention_mask is None:
        if plan.cache_layer(module.layer_idx, key) is None and query.shape[2] != key.shape[2]:
            raise UsageError(
                f"{type(module).__name__} called attention without a mask over a cache that is "
                "not sparseattn's; the query positions are unknown (pass attention_mask, or let "
                "sparse_attention supply the cache)"
            )
        attention_mask = VisibilityInfo(0, 0)
    prefill = query.shape[2] > 1 or attention_mask.q_offset == 0
    call = CallInput(
        layer_idx=module.layer_idx,
        query=query,
        key=key,
        value=value,
        q_offset=attention_mask.q_offset,
        kv_offset=attention_mask.kv_offset,
        padding=attention_mask.padding,
        padding_known_absent=attention_mask.padding_absent(allow_sync=prefill),
        row_start=attention_mask.row_start(),
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=sliding_window or attention_mask.local_size,
        softcap=softcap,
    )
    return run_layer(plan, call).contiguous(), None


def lean_dense_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer: Any,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """The lean decode step's shortcut for the plain dense case (``decode.dense_lane``):
    (B, 1, Hq, Dv), or None where ``sparse_attention_forward`` must run."""
    plan = _plan_of(module)
    return dense_lane(
        plan, module.layer_idx, query, key, value, layer, sliding_window, module.scaling
    )


AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sparse_mask)


def _plan_of(module: nn.Module) -> SparsePlan:
    plan = _ACTIVE.get(module)
    if plan is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) called the "
            "sparseattn attention outside a `with sparseattn.sparse_attention(model, ...)` block"
        )
    return plan


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's attention layers that route through AttentionInterface.

    Raises:
        ValueError: the model does not support attention backends, naming the layers missing.
    """
    named = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    supported = getattr(model, "_supports_attention_backend", False)
    good = [m for _, m in named if hasattr(m, "layer_idx") and hasattr(m, "config")]
    missing = [
        f"{n} ({type(m).__name__})"
        for n, m in named
        if not (hasattr(m, "layer_idx") and hasattr(m, "config"))
    ]
    if not supported or not good or missing:
        listed = (
            ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            if missing
            else "none found"
        )
        raise UsageError(
            f"unsupported model {type(model).__name__}: its attention does not go through "
            f"transformers' AttentionInterface (layers missing support: {listed}); supported are "
            "models whose attention layers call ALL_ATTENTION_FUNCTIONS (Llama, Qwen2/3, Mistral, "
            "Gemma 2/3, Phi-3 and most current decoder-only models)"
        )
    return good


def model_configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every config of the model and its sub-configs: each names the attention implementation."""
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
            for sub in getattr(config, "sub_configs", {}) or {}:
                sub_config = getattr(config, sub, None)
                if isinstance(sub_config, PretrainedConfig):
                    seen.setdefault(id(sub_config), sub_config)
    return list(seen.values())


def _built(value: Any, knobs: dict[str, Any], kind: type, build, what: str) -> Any:
    """``value`` as an instance of ``kind``: built by ``build(name, **knobs)`` from a name, or
    the instance as given (knobs then refused: they belong on the instance); None stays None
    (knobs then refused: nothing to apply them to)."""
    if value is None:
        if knobs:
            raise UsageError(f"{what}_knobs {sorted(knobs)} given without {what}=")
        return None
    if isinstance(value, kind):
        if knobs:
            raise UsageError(
                f"{what}_knobs {sorted(knobs)} given with a {kind.__name__} instance; set them on it"
            )
        return value
    return build(value, **knobs)


def _as_method(method: str | Method, knobs: dict[str, Any], what: str = "method") -> Method:
    return _built(method, knobs, Method, build_method, what)


def _as_policy(evict: str | EvictionPolicy | None, knobs: dict[str, Any]) -> EvictionPolicy | None:
    return _built(evict, knobs, EvictionPolicy, build_policy, "evict")


def _as_activation(
    activation: str | ActivationMethod | None, knobs: dict[str, Any]
) -> ActivationMethod | None:
    return _built(activation, knobs, ActivationMethod, build_activation, "activation")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers the lean decode step may take (none where the model lists none)."""
    try:
        return decoder_layers(model)
    except UsageError:
        return []


def decoder_of(model: nn.Module) -> nn.Module:
    """The module whose forward takes the KV cache and builds the mask (the base model)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    return decoder if isinstance(decoder, nn.Module) else model


@contextmanager
def sparse_attention(
    model: nn.Module,
    method: str | Method | None = None,
    *,
    prefill: str | Method | None = None,
    decode: str | Method | None = None,
    evict: str | EvictionPolicy | None = None,
    prefill_knobs: dict[str, Any] | None = None,
    decode_knobs: dict[str, Any] | None = None,
    evict_knobs: dict[str, Any] | None = None,
    activation: str | ActivationMethod | None = None,
    activation_knobs: dict[str, Any] | None = None,
    dense_layers: Sequence[int] = (),
    min_length: int | str = "auto",
    prefill_backend: str = "auto",
    decode_backend: str = "gather",
    page_size: int = 16,
    timing: bool = False,
    lean_decode: bool = True,
    **knobs: Any,
) -> Iterator[RunStats]:
    """Make ``model`` attend sparsely, and its KV cache forget, inside the block.

    Either ``sparse_attention(model, "streaming", window=512)`` (one method for every phase it
    supports, dense for the others) or the two-phase form
    ``sparse_attention(model, prefill="tri_shape", decode="quest", prefill_knobs=..., ...)``;
    either form composes with an eviction policy (``evict="streaming", evict_knobs=...``).
    Every forward or ``generate`` that caches runs on sparseattn's cache: supplied when none is
    passed, a ``DynamicCache`` passed in (or built by ``generate``) gets our layers in place,
    a ``SparseCache`` is used, and any other cache is used as it is or refused by name when the
    setting needs ours.

    Args:
        model: A transformers causal LM whose attention goes through AttentionInterface.
        method: Registered method name (or a Method instance) used for every phase it supports.
        prefill: Method for prefill and chunked prefill (two-phase form).
        decode: Method for decode steps (two-phase form).
        evict: Eviction policy name (or instance): what the cache keeps.
        prefill_knobs: Knobs of the prefill method.
        decode_knobs: Knobs of the decode method.
        evict_knobs: Knobs of the eviction policy.
        activation: Activation sparsity method name (or instance): at decode steps the
            model's linear layers (or gated MLPs) read only the weights of the channels whose
            inputs pass calibrated thresholds; prefill stays dense (``sparseattn.activation``).
        activation_knobs: Knobs of the activation method (``sparsity``, ``profile``).
        dense_layers: Layer indices that always attend densely (e.g. (0, 1)).
        min_length: Calls whose key length is below this stay dense (sparse would be slower);
            "auto" (default): prompt chunks use the crossover measured once per machine for
            their kernel and head layout (cached in the user cache dir), decode steps 1024.
        prefill_backend: "auto" (default: the C++ block-sparse kernel for float32 on the CPU,
            FlexAttention elsewhere), "cpp", "flex" or "reference" (dense fp32 oracle).
        decode_backend: "gather" (gather the selected pages, then SDPA) or "reference".
        page_size: Cache storage granularity in tokens.
        timing: Time selection and attention per layer (adds a device sync per call).
        lean_decode: Decode steps of Llama, Mistral and Qwen2 decoder layers run as plain
            tensor ops (``integration/step.py``: same weights, same cache and attention
            calls, none of the modules' per-call dispatch); False keeps the modules.
        **knobs: Knobs of ``method`` (single-method form).

    Yields:
        The RunStats that collects measured density, KV bytes and timing (also
        ``last_stats(model)``).
    """
    if method is not None and (prefill or decode or prefill_knobs or decode_knobs):
        raise UsageError("give either `method` (with its knobs) or prefill=/decode=, not both")
    if method is None and knobs:
        raise UsageError(
            f"knobs {sorted(knobs)} given without `method`; use prefill_knobs/decode_knobs"
        )
    if method is not None:
        prefill_method = decode_method = _as_method(method, knobs)
    else:
        prefill_method = _as_method(prefill or "dense", prefill_knobs or {}, "prefill")
        decode_method = _as_method(decode or "dense", decode_knobs or {}, "decode")
    policy = _as_policy(evict, evict_knobs or {})
    sparse_act = _as_activation(activation, activation_knobs or {})
    options = HookOptions(
        dense_layers=frozenset(dense_layers),
        min_length=min_length,
        prefill_backend=prefill_backend,
        decode_backend=decode_backend,
        page_size=page_size,
        timing=timing,
        lean_decode=lean_decode,
    )
    layers = attention_layers(model)
    if any(m in _ACTIVE for m in layers):
        raise UsageError(
            "this model is already inside a sparse_attention() block; nesting is not supported"
        )
    n_layers = len(layers)
    bad = [i for i in dense_layers if not 0 <= i < n_layers]
    if bad:
        raise UsageError(f"dense_layers {bad} out of range; the model has layers 0..{n_layers - 1}")

    for bound in {id(m): m for m in (prefill_method, decode_method)}.values():
        bound.bind(model.config)  # profile-driven methods load / check their profile here
    if sparse_act is not None:
        sparse_act.bind(model)  # its thresholds: the shipped profile, or the given one checked

    stats = RunStats()
    plan = SparsePlan(
        model=model,
        prefill=prefill_method,
        decode=decode_method,
        evict=policy,
        options=options,
        stats=stats,
    )
    plan.make_layers()  # a layer kind we cannot hold, or a RoPE we cannot read, fails now
    decoder = decoder_of(model)
    argument = cache_argument(decoder)

    def bind_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        plan.bind_cache(kwargs, getattr(module, "config", model.config), argument)
        return args, kwargs

    configs = model_configs(model)
    previous = [c._attn_implementation for c in configs]
    for layer in layers:
        _ACTIVE[layer] = plan
    _LAST_STATS[model] = stats
    handle = decoder.register_forward_pre_hook(bind_cache, with_kwargs=True)
    installed = lean = None
    try:
        if sparse_act is not None:  # its decode switch runs after bind_cache has the cache
            installed = install_activation(model, decoder, sparse_act)
            stats.activation = installed.stats
        if options.lean_decode:
            lean = install_lean(
                _decoder_layers(model),
                sparse_attention_forward,
                stats.counters,
                lean_dense_attention,
            )
        for config in configs:
            config._attn_implementation = IMPLEMENTATION
        yield stats
    finally:
        if lean is not None:
            lean.remove()
        if installed is not None:
            installed.remove()
        handle.remove()
        plan.cache = None
        for config, name in zip(configs, previous):
            config._attn_implementation = name
        for layer in layers:
            _ACTIVE.pop(layer, None)


def last_stats(model: nn.Module) -> RunStats:
    """Measured density and timing of the latest run of ``model`` under sparse_attention()."""
    if model not in _LAST_STATS:
        raise UsageError(
            "no stats: run the model inside `with sparseattn.sparse_attention(model, ...)` first"
        )
    return _LAST_STATS[model]


__all__ = [
    "IMPLEMENTATION",
    "Phase",
    "decoder_of",
    "last_stats",
    "model_configs",
    "sparse_attention",
    "sparse_attention_forward",
]

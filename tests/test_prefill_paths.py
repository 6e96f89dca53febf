"""Prefill dispatch: every backend equals the reference through the hook, static patterns are
selected once per forward, and min_length="auto" follows an injected crossover."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest
import torch
from conftest import FAMILIES, left_padded_batch, make_model

import sparseattn
from sparseattn.backends import flex
from sparseattn.errors import UsageError
from sparseattn.integration import crossover
from sparseattn.integration.options import DECODE_MIN_LENGTH, HookOptions
from sparseattn.integration.plan import SparsePlan
from sparseattn.integration.stats import RunStats
from sparseattn.methods.static import Dense, Streaming
from sparseattn.methods.xattention import XAttention

torch.set_grad_enabled(False)


def valid(logits, mask):
    return logits[mask.bool()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "method, knobs",
    [("streaming", dict(sink=16, window=24)), ("block_sparse", dict(top_k=2))],
    ids=["streaming", "block_sparse"],
)
def test_backends_agree_through_the_hook(family, method, knobs):
    """cpp, flex and auto give the reference backend's logits (left-padded batch, GQA, the
    model's own sliding windows, ragged lengths)."""
    model = make_model(family)
    ids, mask = left_padded_batch([83, 52], seed=2)
    common = dict(min_length=0, block_size=16, **knobs)
    with sparseattn.sparse_attention(model, method, prefill_backend="reference", **common):
        expected = model(input_ids=ids, attention_mask=mask).logits
    for backend in ("auto", "cpp", "flex"):
        with sparseattn.sparse_attention(model, method, prefill_backend=backend, **common):
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(valid(got, mask), valid(expected, mask), atol=1e-4, rtol=1e-4)


class CountingStreaming(Streaming):
    calls = 0

    def select(self, q, k, ctx, layout):
        CountingStreaming.calls += 1
        return super().select(q, k, ctx, layout)


class CountingXAttention(XAttention):
    calls = 0

    def select(self, q, k, ctx, layout):
        CountingXAttention.calls += 1
        return super().select(q, k, ctx, layout)


def test_static_pattern_is_selected_once_per_forward(monkeypatch):
    """Both layers of a forward share one static selection and (flex) one BlockMask, and so does
    a later forward of the same shape; a new shape selects again; a dynamic method selects per
    layer."""
    built = []
    real = flex.build_block_mask
    monkeypatch.setattr(flex, "build_block_mask", lambda *a: built.append(1) or real(*a))
    model = make_model("llama")  # 2 layers
    ids, mask = left_padded_batch([96, 96], seed=5)
    CountingStreaming.calls = 0
    method = CountingStreaming(sink=16, window=16, block_size=16)
    with sparseattn.sparse_attention(model, method, min_length=0, prefill_backend="flex"):
        shared = model(input_ids=ids, attention_mask=mask).logits
        assert CountingStreaming.calls == 1 and len(built) == 1
        model(input_ids=ids, attention_mask=mask)  # same shape, nothing padded: reused
        assert CountingStreaming.calls == 1 and len(built) == 1
        model(input_ids=ids[:, :80], attention_mask=mask[:, :80])  # a new shape
        assert CountingStreaming.calls == 2 and len(built) == 2
    with sparseattn.sparse_attention(model, method, min_length=0, prefill_backend="reference"):
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(valid(shared, mask), valid(expected, mask), atol=1e-4, rtol=1e-4)
    CountingXAttention.calls = 0
    with sparseattn.sparse_attention(model, CountingXAttention(block_size=16), min_length=0):
        model(input_ids=ids, attention_mask=mask)
    assert CountingXAttention.calls == 2


def _density_of(model, length, **options):
    ids, mask = left_padded_batch([length], seed=6)
    with sparseattn.sparse_attention(
        model, "streaming", sink=16, window=16, block_size=16, **options
    ) as stats:
        model(input_ids=ids, attention_mask=mask)
    return stats.density("prefill")


def test_auto_min_length_follows_the_measured_crossover():
    model = make_model("llama")
    keys = []

    def measure(key):
        keys.append(key)
        return 100

    with crossover.measured_by(measure):
        assert _density_of(model, 96) == 1.0  # below the crossover: dense
        assert _density_of(model, 128) < 0.7  # at or above: sparse
    assert len(keys) == 1  # measured once for the head layout, then remembered
    key = keys[0]
    assert (key.kernel, key.device, key.dtype) == ("cpp", "cpu", "float32")
    assert (key.num_q_heads, key.num_kv_heads, key.head_dim, key.block_size) == (4, 2, 16, 16)
    assert key.method == ""  # a static pattern: its cost is the kernel's alone
    with crossover.measured_by(lambda key: crossover.NEVER):
        assert _density_of(model, 128) == 1.0  # sparse never faster: never sparse
    with crossover.measured_by(measure):  # an explicit min_length never asks
        assert _density_of(model, 96, min_length=0) < 0.7
    assert len(keys) == 1


def test_a_dynamic_method_has_a_crossover_of_its_own():
    model = make_model("llama")
    ids, mask = left_padded_batch([96], seed=6)
    keys = []
    with crossover.measured_by(lambda key: keys.append(key) or 64):
        for threshold in (0.9, 0.9, 0.8):
            with sparseattn.sparse_attention(
                model, "xattention", threshold=threshold, block_size=16
            ):
                model(input_ids=ids, attention_mask=mask)
    assert [k.method for k in keys] == [
        "xattention[block_size=16,keep_sink=True,profile=,stride=8,threshold=0.9]",
        "xattention[block_size=16,keep_sink=True,profile=,stride=8,threshold=0.8]",
    ]


def test_decode_steps_under_auto_use_the_fixed_threshold():
    from sparseattn.types import AttentionContext, Phase

    plan = SparsePlan(make_model("llama"), Dense(), Dense(), None, HookOptions(), RunStats())
    ctx = AttentionContext(0, Phase.DECODE, 1, 1, 4000, 3999, 0, 4, 2, 0.25)
    with crossover.measured_by(lambda key: pytest.fail("decode must not measure")):
        assert plan.min_length(ctx, torch.zeros(1, 4, 1, 16), Dense()) == DECODE_MIN_LENGTH


def test_crossover_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_CACHE_DIR", str(tmp_path))
    key = crossover.LayoutKey("cpp", "cpu", "float32", 9, 3, 64, 128)
    with crossover.measured_by(lambda k: 3000, persist=True):
        assert crossover.crossover(key) == 3000
    stored = json.loads((tmp_path / "crossover.json").read_text())
    assert stored == {key.text: 3000}
    with crossover.measured_by(lambda k: pytest.fail("must read the file"), persist=True):
        assert crossover.crossover(key) == 3000
    other = crossover.LayoutKey("flex", "cpu", "float32", 9, 3, 64, 128)
    with crossover.measured_by(lambda k: 5000, persist=True):
        assert crossover.crossover(other) == 5000
    assert len(json.loads((tmp_path / "crossover.json").read_text())) == 2


def test_crossover_key_names_threads_kernel_build_and_version(monkeypatch):
    """A crossover measured at one thread count, kernel build or package version is never
    reused at another."""
    key = crossover.LayoutKey("cpp", "cpu", "float32", 9, 3, 64, 128)
    before = key.text
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert key.text != before
    finally:
        torch.set_num_threads(threads)
    assert key.text == before
    crossover.kernel_build.cache_clear()
    monkeypatch.setattr(crossover.cpp, "_FLAGS", [*crossover.cpp._FLAGS, "-DANOTHER_BUILD"])
    assert key.text != before  # the kernel's compile flags (or sources) changed
    monkeypatch.undo()
    crossover.kernel_build.cache_clear()
    assert key.text == before
    monkeypatch.setattr(crossover, "package_version", lambda: "0.0.0-another")
    assert key.text != before


def _write_after_both_read(path, text: str, length: int, barrier) -> None:
    """One writer process: ``crossover._write``, pausing right after it reads the file until
    the other writer has read it too (or 2 s have passed: under a lock it never will)."""
    read = crossover._read

    def read_then_wait(where):
        entries = read(where)
        try:
            barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return entries

    crossover._read = read_then_wait
    crossover._write(path, text, length)


def test_concurrent_writers_keep_both_crossovers(tmp_path):
    """Two processes that measured different layouts at once both keep their entry (no
    read-modify-write race: the file is read again and merged under a lock)."""
    path = tmp_path / "crossover.json"
    path.write_text(json.dumps({"earlier": 1}))
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    writers = [
        context.Process(target=_write_after_both_read, args=(path, text, n, barrier))
        for text, n in (("first", 2), ("second", 3))
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=30)
        assert writer.exitcode == 0
    assert json.loads(path.read_text()) == {"earlier": 1, "first": 2, "second": 3}


@pytest.mark.parametrize("method", [None, XAttention(block_size=32)], ids=["kernel", "xattention"])
def test_measure_returns_a_ladder_length_or_never(method):
    """The real measurement (short, tiny heads): no claim about its value, only its form."""
    key = crossover.LayoutKey("cpp", "cpu", "float32", 2, 1, 16, 32)
    assert crossover.measure(key, method, lengths=(64, 128)) in (64, 128, crossover.NEVER)


def test_bad_min_length_is_refused():
    with pytest.raises(UsageError, match=r"min_length='often' must be an integer >= 0 or 'auto'"):
        HookOptions(min_length="often")

"""Peak memory is measured per setting: a small setting after a large one reports its own peak."""

from __future__ import annotations

import torch
from conftest import VOCAB, make_model

from sparseattn.bench import decode as decode_bench
from sparseattn.bench.peak import PeakMemory
from sparseattn.setting import Setting


def test_peak_memory_is_per_scope_not_since_process_start():
    with PeakMemory() as big:
        block = torch.ones(60_000_000)  # 240 MB
        block.add_(1)
        del block
    with PeakMemory() as small:
        block = torch.ones(5_000_000)  # 20 MB
        block.add_(1)
        del block
    assert big.peak_mb - big.start_mb > 200
    assert small.peak_mb - small.start_mb < 100
    assert small.peak_mb < big.peak_mb - 100


def test_decode_bench_peak_covers_each_settings_own_prefill(monkeypatch):
    """In ``bench decode`` every measurement (transformers' SDPA, the hook's dense path, each
    setting, each ceiling) prefills inside its own peak-memory scope, one prefill per scope, and
    an eviction setting's reported peak is the scope in which its own prefill ran under its
    policy: no setting decodes from a dense prefill run outside its scope."""
    events = []  # ("enter", scope) / ("prefill", evicting) / ("exit", scope), in order

    class TaggedPeak(PeakMemory):
        opened = 0

        def __enter__(self):
            TaggedPeak.opened += 1
            self.scope = TaggedPeak.opened
            events.append(("enter", self.scope))
            return super().__enter__()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            events.append(("exit", self.scope))
            self.peak_mb = 1000.0 + self.scope  # tells which scope a reported peak comes from

    prefill = decode_bench.prefill_cache

    def recorded_prefill(model, ids, batch):
        cache, first = prefill(model, ids, batch)
        origins = [getattr(layer, "origin", None) or ("",) for layer in cache.layers]
        events.append(("prefill", any(origin[0] == "streaming" for origin in origins)))
        return cache, first

    monkeypatch.setattr(decode_bench, "PeakMemory", TaggedPeak)
    monkeypatch.setattr(decode_bench, "prefill_cache", recorded_prefill)
    monkeypatch.setattr(
        decode_bench,
        "benchmark_input",
        lambda tokenizer, length, seed: torch.randint(1, VOCAB, (1, length)),
    )
    setting = Setting.parse("evict=streaming[sink=4,window=28]")
    [record] = decode_bench.run_decode_bench(make_model("llama"), None, setting, [96], steps=2)
    assert record["kept_tokens"] == 32
    open_scope, prefills_in = None, {}
    for kind, value in events:
        if kind == "enter":
            open_scope, prefills_in[value] = value, []
        elif kind == "exit":
            open_scope = None
        else:
            assert open_scope is not None, "a prefill ran outside every peak-memory scope"
            prefills_in[open_scope].append(value)
    assert len(prefills_in) == 4  # SDPA, dense hook, the setting, its ceiling
    assert all(len(prefills) == 1 for prefills in prefills_in.values())
    [evicting] = [scope for scope, prefills in prefills_in.items() if prefills == [True]]
    assert record["peak_mb_setting"] == 1000.0 + evicting

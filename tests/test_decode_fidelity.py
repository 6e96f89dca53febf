"""Fidelity of settings that change decode steps: compared on decode steps, not on the prefill."""

from __future__ import annotations

import pytest
import torch

from sparseattn.bench.frontier import FrontierConfig, read_records, run_frontier
from sparseattn.bench.runner import FIDELITY_DECODE_POSITIONS
from sparseattn.bench.sweep import TaskSpec
from sparseattn.integration.options import HookOptions
from sparseattn.models import load_model
from sparseattn.setting import Setting

torch.set_grad_enabled(False)
LENGTH = 300


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    model, tok = load_model("tiny-random-llama")
    settings = [
        Setting(),
        Setting.parse("decode=streaming[sink=4,window=1024,block_size=16]"),  # holds every key
        Setting.parse("decode=streaming[sink=4,window=32,block_size=16]"),
        Setting.parse("evict=streaming[sink=4,window=32]"),
    ]
    config = FrontierConfig(
        model="tiny-random-llama",
        settings=settings,
        tasks=[TaskSpec("fidelity")],
        lengths=[LENGTH],
        samples=1,
        seed=1,
        options=HookOptions(min_length=0),
    )
    out = tmp_path_factory.mktemp("fidelity")
    run_frontier(config, out, model, tok, progress=False)
    return {r["setting"]: r for r in read_records(out / "results.jsonl")}


def test_dense_keeps_the_prefill_comparison(records):
    dense = records["dense"]
    assert dense["extra"]["fidelity_mode"] == "prefill" and dense["score"] == pytest.approx(1.0)


def test_a_decode_setting_is_compared_on_decode_steps(records):
    whole = records["prefill=dense;decode=streaming[block_size=16,sink=4,window=1024]"]
    short = records["prefill=dense;decode=streaming[block_size=16,sink=4,window=32]"]
    for r in (whole, short):
        assert r["extra"]["fidelity_mode"] == "decode"
        assert r["extra"]["positions"] == FIDELITY_DECODE_POSITIONS
        assert r["prefill_reused"] and r["decode_s_per_token"] > 0
    # a window over every key is dense: the decode steps give dense's distributions (the
    # prefill's, up to float rounding); a 36-key window does not (compared on the prefill,
    # which dense ran, it would score exactly 1)
    assert whole["extra"]["kl"] < 1e-5 and whole["score"] == pytest.approx(1.0, abs=1e-5)
    assert short["extra"]["kl"] > 1e-4 and short["score"] < whole["score"]
    assert short["decode_density"] < 0.5


def test_an_eviction_policy_is_compared_on_decode_steps(records):
    evict = records["evict=streaming[sink=4,window=32]"]
    assert evict["extra"]["fidelity_mode"] == "decode" and evict["extra"]["kl"] > 1e-4
    assert (
        evict["kv_bytes"]
        < 0.5
        * records["prefill=dense;decode=streaming[block_size=16,sink=4,window=1024]"]["kv_bytes"]
    )

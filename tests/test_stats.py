"""Paired statistics: the bootstrap interval's coverage, verdicts, and the report's use of them."""

from __future__ import annotations

import random

import pytest
import torch

from sparseattn.bench.stats import bootstrap_interval, paired_differences
from sparseattn.bench.summary import summarize


def test_bootstrap_interval_covers_the_true_mean_at_its_nominal_rate():
    """On synthetic paired differences with a known mean, the 95% interval covers that mean in
    about 95% of 400 seeded experiments (percentile bootstrap: slightly under for n = 30)."""
    g = torch.Generator().manual_seed(0)
    true_mean, covered, trials = 0.3, 0, 400
    for trial in range(trials):
        values = (true_mean + torch.randn(30, generator=g) * 2.0).tolist()
        interval = bootstrap_interval(values, seed=trial, resamples=1000)
        covered += interval.low <= true_mean <= interval.high
    assert 0.90 <= covered / trials <= 0.98


def test_interval_and_verdicts():
    assert bootstrap_interval([]) is None
    same = bootstrap_interval([0.0] * 10)
    assert (same.low, same.high, same.verdict) == (0.0, 0.0, "indistinguishable")
    assert bootstrap_interval([-1.0, -0.8, -1.2, -0.9] * 5).verdict == "worse"
    assert bootstrap_interval([0.5, 0.7, 0.6] * 5).verdict == "better"
    one = bootstrap_interval([0.25])
    assert one.mean == one.low == one.high == 0.25
    # seeded: the same data give the same interval
    data = [random.Random(1).random() for _ in range(20)]
    assert bootstrap_interval(data, seed=3) == bootstrap_interval(data, seed=3)


def test_paired_differences_use_shared_samples_only():
    mine = {0: {"score": 1.0}, 1: {"score": 0.0}, 2: {"score": 0.5}}
    dense = {0: {"score": 1.0}, 1: {"score": 1.0}, 3: {"score": 0.0}}
    assert paired_differences(mine, dense, "score") == [0.0, -1.0]


def record(setting, sample, score, density, logprob=None, task="t"):
    return {
        "task": task,
        "length": 100,
        "sample": sample,
        "setting": setting,
        "method": setting.split("[")[0],
        "score": score,
        "answer_logprob": logprob,
        "prefill_density": density,
        "decode_density": density,
        "prefill_s": 1.0,
        "decode_s_per_token": 0.1,
        "peak_memory_mb": 1.0,
    }


def test_summary_verdicts_and_pareto_count_only_real_differences():
    """b keeps dense's score on every sample at density 0.3; a scores one sample higher at
    density 0.5 (a difference its interval cannot tell from 0); c loses everywhere. Only real
    differences count, so b dominates a; c is worse but the cheapest, so it stays on the front."""
    records = []
    for s in range(20):
        dense_score = float(s % 2)
        records.append(record("dense", s, dense_score, 1.0, logprob=-1.0))
        records.append(record("b", s, dense_score, 0.3, logprob=-1.0))
        records.append(record("a", s, 1.0 if s == 0 else dense_score, 0.5, logprob=-1.1 + s % 2))
        records.append(record("c", s, 0.0, 0.1, logprob=-5.0))
    rows = {r.setting: r for r in summarize(records) if r.task == "t"}
    assert rows["dense"].verdict == "reference"
    assert rows["b"].verdict == "indistinguishable" and rows["b"].score_delta == 0.0
    assert rows["a"].verdict == "indistinguishable"
    assert rows["a"].score_delta == pytest.approx(1 / 20)
    assert rows["c"].verdict == "worse" and rows["c"].loglik_verdict == "worse"
    assert rows["c"].loglik_delta == pytest.approx(-4.0)
    assert rows["a"].loglik_delta == pytest.approx(0.4)
    pareto = {name for name, row in rows.items() if row.pareto}
    assert pareto == {"b", "c"}
    overall = {r.setting: r for r in summarize(records) if r.task == "ALL"}
    assert overall["c"].verdict == "worse" and overall["c"].score_delta == pytest.approx(-0.5)

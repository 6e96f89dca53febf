"""Aggregate frontier records into one row per (task, length, setting)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

from .stats import bootstrap_interval, paired_differences


@dataclass
class SummaryRow:
    """Mean and spread of one setting on one task at one length; speedups against dense."""

    task: str
    length: int
    setting: str
    method: str
    n_samples: int
    score_mean: float
    score_std: float
    prefill_density_mean: float | None
    decode_density_mean: float | None
    prefill_speedup: float | None
    decode_speedup: float | None
    peak_memory_mb_mean: float | None
    score_delta: float | None = None  # mean paired (setting - dense) score over shared samples
    score_delta_low: float | None = None  # its 95% bootstrap interval
    score_delta_high: float | None = None
    loglik_delta: float | None = None  # mean paired answer log-likelihood (nats) vs dense
    loglik_delta_low: float | None = None
    loglik_delta_high: float | None = None
    verdict: str = ""  # vs dense by the score interval: better / worse / indistinguishable
    loglik_verdict: str = ""  # the same by the answer log-likelihood interval
    pareto: bool = False
    informative: bool = True

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _speedup(dense: dict[int, dict], mine: dict[int, dict], key: str) -> float | None:
    """mean dense time / mean setting time over the samples both have."""
    shared = [s for s in mine if s in dense and mine[s].get(key) and dense[s].get(key)]
    if not shared:
        return None
    return statistics.fmean(dense[s][key] for s in shared) / statistics.fmean(
        mine[s][key] for s in shared
    )


LEVELS = {"better": 1, "indistinguishable": 0, "reference": 0, "worse": -1}
PROMPT_ONLY_TASKS = frozenset({"fidelity"})  # scored on the prompt alone (tasks/documents.py)


def dense_by_construction(record: dict[str, Any]) -> bool:
    """True for a record of a decode-only setting (no prefill method, no eviction policy) on a
    task that scores the prompt alone: the setting runs the prompt exactly as dense does, so
    its figures there are dense's by construction and say nothing about it."""
    phases = record.get("phase_policy") or {}
    decode_only = (
        phases.get("prefill") == "dense"
        and phases.get("evict") is None
        and phases.get("decode") not in (None, "dense")
    )
    return decode_only and record["task"].split("[", 1)[0] in PROMPT_ONLY_TASKS


def score_level(row: SummaryRow) -> float:
    """What the Pareto front compares: the verdict against dense when there is one (only real
    differences count: a setting indistinguishable from dense ranks with dense), else the mean."""
    return LEVELS[row.verdict] if row.verdict else row.score_mean


def pareto_flags(rows: list[SummaryRow]) -> None:
    """Mark rows not dominated in (higher score level, lower prefill density); dense counts as
    density 1."""
    points = [
        (score_level(r), 1.0 if r.prefill_density_mean is None else r.prefill_density_mean)
        for r in rows
    ]
    for row, (score, density) in zip(rows, points):
        row.pareto = not any(
            s >= score and d <= density and (s > score or d < density) for s, d in points
        )


def summarize(records: list[dict[str, Any]]) -> list[SummaryRow]:
    """One SummaryRow per (task, length, setting), plus task "ALL" means per (length, setting).

    "ALL" pools the tasks of a setting, leaving out the cells where it equals dense by
    construction (``dense_by_construction``: a decode-only setting on fidelity); their rows
    per task stay.
    """
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    methods: dict[str, str] = {}
    unpooled: set[tuple] = set()  # (task, length, setting) left out of "ALL"
    for r in records:
        cells[(r["task"], r["length"], r["setting"])][r["sample"]] = r
        methods[r["setting"]] = r["method"]
        if dense_by_construction(r):
            unpooled.add((r["task"], r["length"], r["setting"]))
    rows: list[SummaryRow] = []
    differences: dict[tuple, list] = defaultdict(list)  # (length, setting): [(mine, dense)]
    for (task, length, setting), by_sample in sorted(cells.items()):
        recs = list(by_sample.values())
        scores = [r["score"] for r in recs]
        dense = cells.get((task, length, "dense"), {})
        rows.append(
            SummaryRow(
                task=task,
                length=length,
                setting=setting,
                method=methods[setting],
                n_samples=len(recs),
                score_mean=statistics.fmean(scores),
                score_std=statistics.pstdev(scores),
                prefill_density_mean=_mean([r.get("prefill_density") for r in recs]),
                decode_density_mean=_mean([r.get("decode_density") for r in recs]),
                prefill_speedup=_speedup(dense, by_sample, "prefill_s") if dense else None,
                decode_speedup=_speedup(dense, by_sample, "decode_s_per_token") if dense else None,
                peak_memory_mb_mean=_mean([r.get("peak_memory_mb") for r in recs]),
            )
        )
        if dense:
            compare(rows[-1], [(by_sample, dense)])
            if (task, length, setting) not in unpooled:
                differences[(length, setting)].append((by_sample, dense))
    groups: dict[tuple, list[SummaryRow]] = defaultdict(list)
    for row in rows:
        groups[(row.task, row.length)].append(row)
    for group in groups.values():
        dense_row = next((r for r in group if r.setting == "dense"), None)
        for row in group:
            row.informative = dense_row is None or dense_row.score_mean >= 0.3
        pareto_flags(group)
    pooled = [r for r in rows if (r.task, r.length, r.setting) not in unpooled]
    rows += _aggregate_all(pooled, differences)
    return rows


def compare(row: SummaryRow, pairs: list[tuple[dict, dict]]) -> None:
    """Fill ``row``'s paired differences against dense, their intervals and verdicts.

    Args:
        pairs: ({sample: record} of the setting, {sample: record} of dense) per task; pooled
            over tasks, each (task, sample) is one unit.
    """
    if row.setting == "dense":
        row.verdict = row.loglik_verdict = "reference"
        return
    for key, prefix in (("score", "score"), ("answer_logprob", "loglik")):
        values = [d for mine, dense in pairs for d in paired_differences(mine, dense, key)]
        interval = bootstrap_interval(values)
        if interval is None:
            continue
        setattr(row, f"{prefix}_delta", interval.mean)
        setattr(row, f"{prefix}_delta_low", interval.low)
        setattr(row, f"{prefix}_delta_high", interval.high)
        setattr(row, "verdict" if prefix == "score" else "loglik_verdict", interval.verdict)


def _aggregate_all(rows: list[SummaryRow], differences: dict[tuple, list]) -> list[SummaryRow]:
    by_setting: dict[tuple, list[SummaryRow]] = defaultdict(list)
    for row in rows:
        by_setting[(row.length, row.setting)].append(row)
    out = []
    for (length, setting), group in sorted(by_setting.items()):
        out.append(
            SummaryRow(
                task="ALL",
                length=length,
                setting=setting,
                method=group[0].method,
                n_samples=sum(r.n_samples for r in group),
                score_mean=statistics.fmean(r.score_mean for r in group),
                score_std=statistics.pstdev([r.score_mean for r in group]),
                prefill_density_mean=_mean([r.prefill_density_mean for r in group]),
                decode_density_mean=_mean([r.decode_density_mean for r in group]),
                prefill_speedup=_mean([r.prefill_speedup for r in group]),
                decode_speedup=_mean([r.decode_speedup for r in group]),
                peak_memory_mb_mean=_mean([r.peak_memory_mb_mean for r in group]),
            )
        )
        if differences.get((length, setting)):
            compare(out[-1], differences[(length, setting)])
    by_length: dict[int, list[SummaryRow]] = defaultdict(list)
    for row in out:
        by_length[row.length].append(row)
    for group in by_length.values():
        pareto_flags(group)
    return out

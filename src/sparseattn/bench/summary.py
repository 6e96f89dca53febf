"""Aggregate frontier records into one row per (task, length, setting)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

from ..registry import METHODS
from .stats import bootstrap_interval, paired_differences

SCORE_RANGE = (0.0, 1.0)  # every task scores a sample in [0, 1]


@dataclass
class SummaryRow:
    """Mean and spread of one setting on one task at one length; speedups and KV share against
    dense."""

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
    kv_share: float | None = None  # mean kv_bytes / dense's mean kv_bytes over shared samples
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

    @property
    def score_interval(self) -> tuple[float, float] | None:
        """The paired 95% interval of (setting - dense) moved onto the score scale: the mean
        score plus (low - Δ, high - Δ), clipped to the scores' range [0, 1]. It holds dense's
        score on the same samples exactly when the verdict is "indistinguishable" (clipping
        keeps that: dense's score lies in [0, 1]). None without a dense comparison."""
        if self.score_delta is None:
            return None
        shift = self.score_mean - self.score_delta
        low, high = SCORE_RANGE
        return (
            min(max(self.score_delta_low + shift, low), high),
            min(max(self.score_delta_high + shift, low), high),
        )


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _mean_ratio(pairs: list[tuple[dict[int, dict], dict[int, dict]]], key: str) -> float | None:
    """mean ``key`` of the first / mean ``key`` of the second, over the units both have.

    Args:
        pairs: ({sample: record}, {sample: record}) per task; each (task, sample) is one unit.
    """
    top, bottom = [], []
    for first, second in pairs:
        for s in first:
            if s in second and first[s].get(key) is not None and second[s].get(key):
                top.append(first[s][key])
                bottom.append(second[s][key])
    return statistics.fmean(top) / statistics.fmean(bottom) if top else None


def _speedup(dense: dict[int, dict], mine: dict[int, dict], key: str) -> float | None:
    """mean dense time / mean setting time over the samples both have."""
    return _mean_ratio([(dense, mine)], key)


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
                kv_share=_mean_ratio([(by_sample, dense)], "kv_bytes") if dense else None,
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
                kv_share=_mean_ratio(differences.get((length, setting), []), "kv_bytes"),
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


KEEPS_ACCURACY = frozenset({"indistinguishable", "better"})
RANKING = (
    "Recommended: per length, the settings whose pooled (ALL) score, and answer log-likelihood "
    "where measured, are indistinguishable from dense or better, that buy something (a prefill "
    "or decode speedup above 1.00, or a KV share below 1.00, as printed to two decimals) and "
    "that are not oracles (analysis only); ranked by the larger of the two speedups as "
    "printed, ties by the smaller KV share, then by name; at most {per_length} per length."
)


def deployable(method: str) -> bool:
    """False when a setting's family ('dense+decode_oracle') holds an analysis-only method (an
    oracle: ``is_speedup`` False), which computes the full attention to choose."""
    names = [n for n in method.split("+") if not n.startswith("evict:") and n != "chunked"]
    return all(METHODS[n].is_speedup for n in names if n in METHODS)


def _gain(row: SummaryRow) -> float:
    """The larger of a row's prefill and decode speedups as printed (two decimals; 1 when
    neither was measured)."""
    speedups = [s for s in (row.prefill_speedup, row.decode_speedup) if s is not None]
    return round(max(speedups, default=1.0), 2)


def _share(row: SummaryRow) -> float:
    """A row's KV share as printed (two decimals; 1 when not measured)."""
    return 1.0 if row.kv_share is None else round(row.kv_share, 2)


def recommend(rows: list[SummaryRow], per_length: int = 3) -> dict[int, list[SummaryRow]]:
    """The fastest settings that keep dense's accuracy, per length (rule: ``RANKING``).

    Args:
        rows: ``summarize``'s rows; only the pooled "ALL" rows are read.
        per_length: at most this many settings per length.

    Returns:
        {length: pooled rows, best first}; every length of ``rows``, an empty list where no
        setting qualifies.
    """
    chosen: dict[int, list[SummaryRow]] = {}
    for length in sorted({r.length for r in rows}):
        candidates = [
            r
            for r in rows
            if r.task == "ALL"
            and r.length == length
            and r.setting != "dense"
            and deployable(r.method)
            and r.verdict in KEEPS_ACCURACY
            and (not r.loglik_verdict or r.loglik_verdict in KEEPS_ACCURACY)
            and (_gain(r) > 1.0 or _share(r) < 1.0)
        ]
        candidates.sort(key=lambda r: (-_gain(r), _share(r), r.setting))
        chosen[length] = candidates[:per_length]
    return chosen


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def recommendation_lines(rows: list[SummaryRow], per_length: int = 3) -> list[str]:
    """``recommend``'s answer as plain text, one line per setting (or one per empty length):
    '4096 tokens: streaming[window=512]  prefill 2.10x, decode 1.30x, KV share 0.25'."""
    lines = []
    for length, chosen in recommend(rows, per_length).items():
        if not chosen:
            lines.append(f"{length} tokens: none keeps dense's accuracy and is faster or smaller")
        for r in chosen:
            share = "-" if r.kv_share is None else f"{r.kv_share:.2f}"
            lines.append(
                f"{length} tokens: {r.setting}  prefill {_times(r.prefill_speedup)}, "
                f"decode {_times(r.decode_speedup)}, KV share {share}"
            )
    return lines

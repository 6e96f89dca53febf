"""The report's numbers equal an independent recomputation from results.jsonl."""

from __future__ import annotations

import csv
import json
import random
import statistics

import pytest

from sparseattn.bench.report import tables, write_report
from sparseattn.bench.summary import summarize


def synthetic_records():
    rng = random.Random(0)
    records = []
    settings = {
        "dense": ("dense", 1.0, 10.0),
        "streaming[window=64]": ("streaming", 0.3, 4.0),
        "streaming[window=256]": ("streaming", 0.6, 7.0),
        "oracle[top_p=0.9]": ("oracle", 0.2, 12.0),
    }
    for task in ("niah", "qa"):
        for length in (1000, 2000):
            for setting, (method, density, seconds) in settings.items():
                for sample in range(3):
                    base = (
                        0.1 if (task == "qa" and length == 2000) else 0.9
                    )  # qa@2000: dense below 0.3
                    score = min(
                        1.0, max(0.0, base * (0.5 + density / 2) + rng.choice([-0.1, 0, 0.1]))
                    )
                    records.append(
                        {
                            "task": task,
                            "length": length,
                            "sample": sample,
                            "seed": 0,
                            "method": method,
                            "setting": setting,
                            "knobs": {},
                            "phase_policy": {},
                            "score": score,
                            "prefill_density": density,
                            "decode_density": density,
                            "prefill_s": seconds * length / 1000 * (1 + 0.1 * sample),
                            "decode_s_per_token": 0.1 * density + 0.05,
                            "peak_memory_mb": 100.0,
                            "model": "m",
                            "versions": {"torch": "x"},
                            "answer": "",
                            "references": [],
                            "n_input_tokens": length,
                            "extra": {},
                        }
                    )
    return records


@pytest.fixture
def report_dir(tmp_path):
    records = synthetic_records()
    text = (
        "".join(json.dumps(r) + "\n" for r in records) + '{"task": "niah", "len'
    )  # cut-off last line
    (tmp_path / "results.jsonl").write_text(text)
    write_report(tmp_path)
    return tmp_path, records


def load_summary(path):
    with open(path / "summary.csv") as f:
        return {(r["task"], int(r["length"]), r["setting"]): r for r in csv.DictReader(f)}


def test_summary_matches_independent_recomputation(report_dir):
    path, records = report_dir
    summary = load_summary(path)
    for task, length, setting in [
        ("niah", 1000, "streaming[window=64]"),
        ("qa", 2000, "oracle[top_p=0.9]"),
    ]:
        mine = [
            r for r in records if (r["task"], r["length"], r["setting"]) == (task, length, setting)
        ]
        dense = [
            r for r in records if (r["task"], r["length"], r["setting"]) == (task, length, "dense")
        ]
        row = summary[(task, length, setting)]
        assert float(row["score_mean"]) == pytest.approx(sum(r["score"] for r in mine) / len(mine))
        assert float(row["score_std"]) == pytest.approx(
            statistics.pstdev([r["score"] for r in mine])
        )
        assert float(row["prefill_density_mean"]) == pytest.approx(mine[0]["prefill_density"])
        speedup = (sum(r["prefill_s"] for r in dense) / 3) / (sum(r["prefill_s"] for r in mine) / 3)
        assert float(row["prefill_speedup"]) == pytest.approx(speedup)
        decode = dense[0]["decode_s_per_token"] / mine[0]["decode_s_per_token"]
        assert float(row["decode_speedup"]) == pytest.approx(decode)
        assert int(row["n_samples"]) == 3


def test_pareto_and_informative_flags(report_dir):
    path, records = report_dir
    summary = load_summary(path)
    cell = {s: v for (t, n, s), v in summary.items() if (t, n) == ("niah", 1000)}
    # only real differences count: a setting ranks by its verdict against dense
    level = {"better": 1, "indistinguishable": 0, "reference": 0, "worse": -1}
    means = {s: level[v["verdict"]] for s, v in cell.items()}
    density = {s: float(v["prefill_density_mean"]) for s, v in cell.items()}
    assert cell["dense"]["verdict"] == "reference"
    for s in cell:
        dominated = any(
            means[o] >= means[s]
            and density[o] <= density[s]
            and (means[o] > means[s] or density[o] < density[s])
            for o in cell
        )
        assert (cell[s]["pareto"] == "True") == (not dominated)
    assert all(
        v["informative"] == "False" for (t, n, s), v in summary.items() if (t, n) == ("qa", 2000)
    )
    assert all(
        v["informative"] == "True" for (t, n, s), v in summary.items() if (t, n) == ("niah", 2000)
    )
    overall = summary[("ALL", 1000, "dense")]
    per_task = [float(summary[(t, 1000, "dense")]["score_mean"]) for t in ("niah", "qa")]
    assert float(overall["score_mean"]) == pytest.approx(sum(per_task) / 2)


def test_report_files_are_self_contained(report_dir):
    path, _ = report_dir
    md = (path / "report.md").read_text()
    assert "uninformative" in md and "## 2000 tokens" in md
    page = (path / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    names = (
        "score_vs_density.png",
        "score_vs_speedup.png",
        "score_vs_decode_speedup.png",
        "heatmap.png",
    )
    assert page.count("data:image/png;base64,") == len(names)
    for name in names:
        assert (path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pooled_column_leaves_out_cells_dense_by_construction():
    """A decode-only setting (no prefill method, no eviction) runs the prompt exactly as dense
    does, so on fidelity (which scores the prompt alone) it equals dense by construction: the
    pooled ALL figure leaves that cell out. It keeps fidelity for a setting with a prefill
    method or an eviction policy, and every other task for all of them."""
    phases = {
        "dense": {"prefill": "dense", "decode": "dense", "evict": None},
        "quest[budget=64]": {"prefill": "dense", "decode": "quest", "evict": None},
        "streaming[window=64]": {"prefill": "streaming", "decode": "streaming", "evict": None},
        "evict=snapkv[capacity=64]": {"prefill": "dense", "decode": "dense", "evict": "snapkv"},
        "tokenselect[budget=64]": {"prefill": "dense", "decode": "tokenselect", "evict": None},
    }
    scores = {  # (fidelity, niah) per sample 0..3
        "dense": ([1.0] * 4, [1.0, 1.0, 0.0, 1.0]),
        "quest[budget=64]": ([1.0] * 4, [0.0, 1.0, 0.0, 0.0]),
        "streaming[window=64]": ([0.6, 0.7, 0.5, 0.6], [0.0, 1.0, 0.0, 0.0]),
        "evict=snapkv[capacity=64]": ([1.0] * 4, [1.0, 0.0, 0.0, 1.0]),
        "tokenselect[budget=64]": ([1.0] * 4, None),  # fidelity alone: nothing to pool
    }
    records = []
    for setting, (fidelity, niah) in scores.items():
        for task, values in (("fidelity", fidelity), ("niah[depth=0.5]", niah)):
            for sample, score in enumerate(values or []):
                records.append(
                    {
                        "task": task,
                        "length": 1000,
                        "sample": sample,
                        "setting": setting,
                        "method": setting.split("[")[0],
                        "phase_policy": phases[setting],
                        "score": score,
                        "prefill_density": 1.0,
                        "prefill_s": 1.0,
                    }
                )
    rows = summarize(records)
    pooled = {r.setting: r for r in rows if r.task == "ALL"}
    cell = {(r.task, r.setting): r for r in rows}

    quest, niah_quest = pooled["quest[budget=64]"], cell[("niah[depth=0.5]", "quest[budget=64]")]
    assert quest.n_samples == 4  # niah alone
    assert quest.score_mean == pytest.approx(0.25)
    assert quest.score_delta == pytest.approx(niah_quest.score_delta) == pytest.approx(-0.5)
    assert ("fidelity", "quest[budget=64]") in cell  # the task's own column keeps it
    assert "tokenselect[budget=64]" not in pooled

    for setting in ("streaming[window=64]", "evict=snapkv[capacity=64]", "dense"):
        row = pooled[setting]
        fidelity, niah = scores[setting]
        assert row.n_samples == 8
        assert row.score_mean == pytest.approx(statistics.fmean(fidelity + niah))
    assert pooled["streaming[window=64]"].score_delta == pytest.approx((-0.4 - 0.5) / 2)

    [(_, header, body)] = tables(rows)  # a setting with nothing pooled still gets its line
    line = next(line for line in body if line[0] == "tokenselect[budget=64]")
    assert line[header.index("ALL")] == "" and line[header.index("prefill speedup")] == "-"

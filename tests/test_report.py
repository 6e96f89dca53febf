"""The report's numbers equal an independent recomputation from results.jsonl."""

from __future__ import annotations

import csv
import json
import random
import statistics

import pytest

from sparseattn.bench.plots import kind_panels, kinds_of, setting_kinds
from sparseattn.bench.report import loglik_cell, score_cell, tables, write_report
from sparseattn.bench.summary import SummaryRow, recommend, recommendation_lines, summarize


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
    assert md.index("## Recommended") < md.index("## 1000 tokens")  # the answer comes first
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


def row(**changes) -> SummaryRow:
    """A pooled row with the given figures; the rest empty."""
    base = dict(
        task="ALL",
        length=1000,
        setting="quest[budget=64]",
        method="quest",
        n_samples=5,
        score_mean=0.8,
        score_std=0.0,
        prefill_density_mean=None,
        decode_density_mean=None,
        prefill_speedup=None,
        decode_speedup=None,
        peak_memory_mb_mean=None,
    )
    return SummaryRow(**{**base, **changes})


def test_cell_reads_score_interval_and_mark():
    """The paired interval of (setting - dense) moved onto the score scale, clipped to [0, 1]:
    it holds dense's score exactly when the mark is '='."""
    paired = dict(score_delta=-0.2, score_delta_low=-0.6, score_delta_high=0.0)
    assert score_cell(row(**paired, verdict="indistinguishable")) == "0.80 [0.40, 1.00] ="
    clipped = row(score_mean=0.0, **paired, verdict="indistinguishable")
    assert score_cell(clipped) == "0.00 [0.00, 0.20] ="
    worse = row(
        score_mean=0.3,
        score_delta=-0.5,
        score_delta_low=-0.7,
        score_delta_high=-0.3,
        verdict="worse",
        pareto=True,
        informative=False,
    )
    assert score_cell(worse) == "0.30 [0.10, 0.50] ↓ * (uninformative)"
    assert score_cell(row(setting="dense", score_mean=1.0, verdict="reference")) == "1.00"
    likelihood = row(
        loglik_delta=-4.19, loglik_delta_low=-7.83, loglik_delta_high=-0.7, loglik_verdict="worse"
    )
    assert loglik_cell(likelihood) == "-4.19 [-7.83, -0.70] ↓"
    assert loglik_cell(row()) == "-"


def record(setting, method, phases, sample, score, task="niah", length=1000, **measured):
    """One frontier record of a hand-made run: dense's timings and bytes unless given."""
    figures = dict(
        prefill_s=1.0,
        decode_s_per_token=0.1,
        kv_bytes=1000,
        peak_memory_mb=100.0,
        answer_logprob=-1.0,
        prefill_density=1.0,
        decode_density=1.0,
    )
    return {
        "task": task,
        "length": length,
        "sample": sample,
        "setting": setting,
        "method": method,
        "phase_policy": dict(zip(("prefill", "decode", "evict"), phases)),
        "score": score,
        **figures,
        **measured,
    }


def test_kv_share_is_mean_bytes_over_dense_mean_bytes_on_the_same_samples():
    dense = ("dense", "dense", None)
    snapkv = ("dense", "dense", "snapkv")
    setting = "evict=snapkv[compression=0.5]"
    records = [
        record("dense", "dense", dense, 0, 1.0, kv_bytes=100),
        record("dense", "dense", dense, 1, 1.0, kv_bytes=200),
        record("dense", "dense", dense, 2, 1.0, kv_bytes=900),  # the setting lacks sample 2
        record(setting, "dense+evict:snapkv", snapkv, 0, 1.0, kv_bytes=25, peak_memory_mb=60.0),
        record(setting, "dense+evict:snapkv", snapkv, 1, 1.0, kv_bytes=75, peak_memory_mb=80.0),
        record("dense", "dense", dense, 0, 1.0, task="qa", kv_bytes=300),
        record(setting, "dense+evict:snapkv", snapkv, 0, 1.0, task="qa", kv_bytes=60),
        record("dense", "dense", dense, 0, 0.5, task="fidelity", kv_bytes=None),
        record(setting, "dense+evict:snapkv", snapkv, 0, 0.5, task="fidelity", kv_bytes=None),
    ]
    rows = summarize(records)
    cell = {(r.task, r.setting): r for r in rows}
    assert cell[("niah", setting)].kv_share == pytest.approx(((25 + 75) / 2) / ((100 + 200) / 2))
    assert cell[("qa", setting)].kv_share == pytest.approx(60 / 300)
    assert cell[("fidelity", setting)].kv_share is None  # no bytes recorded
    pooled = ((25 + 75 + 60) / 3) / ((100 + 200 + 300) / 3)  # each (task, sample) one unit
    assert cell[("ALL", setting)].kv_share == pytest.approx(pooled)
    assert cell[("ALL", "dense")].kv_share == pytest.approx(1.0)

    [(_, header, body)] = tables(rows)
    assert header[-6:] == [
        "ll Δ",
        "prefill density",
        "prefill speedup",
        "decode speedup",
        "KV share",
        "peak MiB",
    ]
    line = next(line for line in body if line[0] == setting)
    assert line[header.index("KV share")] == f"{pooled:.2f}" == "0.27"
    assert line[header.index("ll Δ")] == "+0.00 [+0.00, +0.00] ="
    assert line[header.index("niah")] == "1.00 [1.00, 1.00] = *"  # ties dense: on the front
    assert line[header.index("peak MiB")] == "90"  # mean over tasks of 70, 100, 100


RECOMMEND_SETTINGS = {  # setting: (family, phase policy, score per sample, figures)
    "dense": ("dense", ("dense", "dense", None), None, {}),
    # the same answers as dense, decode 2x / 4x faster: both kept, the faster first
    "prefill=dense;decode=quest[budget=64]": (
        "dense+quest",
        ("dense", "quest", None),
        None,
        {"decode_s_per_token": 0.05},
    ),
    "prefill=dense;decode=tokenselect[budget=64]": (
        "dense+tokenselect",
        ("dense", "tokenselect", None),
        None,
        {"decode_s_per_token": 0.025},
    ),
    # as fast as dense but half the KV cache: kept, after the faster ones
    "evict=snapkv[compression=0.5]": (
        "dense+evict:snapkv",
        ("dense", "dense", "snapkv"),
        None,
        {"kv_bytes": 500},
    ),
    # fastest of all but worse than dense: left out
    "streaming[window=64]": (
        "streaming",
        ("streaming", "streaming", None),
        [0.0] * 6,
        {"prefill_s": 0.2},
    ),
    # same score, worse answer likelihood: left out
    "prefill=dense;decode=delta[budget=64]": (
        "dense+delta",
        ("dense", "delta", None),
        None,
        {"decode_s_per_token": 0.02, "answer_logprob": -5.0},
    ),
    # an oracle (analysis only): left out however fast
    "prefill=dense;decode=decode_oracle[budget=64]": (
        "dense+decode_oracle",
        ("dense", "decode_oracle", None),
        None,
        {"decode_s_per_token": 0.01},
    ),
    # indistinguishable but slower and no smaller: buys nothing, left out
    "prefill=dense;decode=tidaldecode[budget=64]": (
        "dense+tidaldecode",
        ("dense", "tidaldecode", None),
        None,
        {"decode_s_per_token": 0.2},
    ),
}
DENSE_SCORES = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def recommend_records():
    records = []
    for setting, (method, phases, scores, figures) in RECOMMEND_SETTINGS.items():
        for sample, score in enumerate(scores or DENSE_SCORES):
            records.append(record(setting, method, phases, sample, score, **figures))
    for sample, score in enumerate(DENSE_SCORES):  # at 2000 only a worse setting: none
        records.append(
            record("dense", "dense", ("dense", "dense", None), sample, score, length=2000)
        )
        records.append(
            record(
                "streaming[window=64]",
                "streaming",
                ("streaming", "streaming", None),
                sample,
                0.0,
                length=2000,
                prefill_s=0.2,
            )
        )
    return records


def test_recommend_keeps_the_fastest_settings_indistinguishable_from_dense():
    rows = summarize(recommend_records())
    chosen = recommend(rows)
    assert [r.setting for r in chosen[1000]] == [
        "prefill=dense;decode=tokenselect[budget=64]",
        "prefill=dense;decode=quest[budget=64]",
        "evict=snapkv[compression=0.5]",
    ]
    assert chosen[2000] == []
    assert [r.setting for r in recommend(rows, per_length=1)[1000]] == [
        "prefill=dense;decode=tokenselect[budget=64]"
    ]
    assert recommendation_lines(rows) == [
        "1000 tokens: prefill=dense;decode=tokenselect[budget=64]  "
        "prefill 1.00x, decode 4.00x, KV share 1.00",
        "1000 tokens: prefill=dense;decode=quest[budget=64]  "
        "prefill 1.00x, decode 2.00x, KV share 1.00",
        "1000 tokens: evict=snapkv[compression=0.5]  prefill 1.00x, decode 1.00x, KV share 0.50",
        "2000 tokens: none keeps dense's accuracy and is faster or smaller",
    ]


def test_recommend_breaks_speed_ties_by_kv_share():
    fast = dict(verdict="indistinguishable", decode_speedup=2.0)
    rows = [
        row(setting="a", kv_share=1.0, **fast),
        row(setting="b", kv_share=0.5, **fast),
        row(setting="c", kv_share=0.9, verdict="indistinguishable", decode_speedup=2.001),
    ]
    assert [r.setting for r in recommend(rows)[1000]] == ["b", "c", "a"]  # 2.00 = 2.00 printed


def test_settings_go_to_the_panel_of_each_of_their_kinds():
    """Prefill methods against prefill density, decode methods against decode density,
    eviction against KV share; a setting of several kinds in each of its panels; dense in all."""
    kinds = {
        "dense": ("dense", ("dense", "dense", None)),
        "xattention[threshold=0.9]": ("xattention", ("xattention", "dense", None)),
        "prefill=dense;decode=quest[budget=64]": ("dense+quest", ("dense", "quest", None)),
        "streaming[window=64]": ("streaming", ("streaming", "streaming", None)),
        "evict=snapkv[compression=0.5]": ("dense+evict:snapkv", ("dense", "dense", "snapkv")),
        "tri_shape;evict=snapkv[compression=0.5]": (
            "tri_shape+evict:snapkv",
            ("tri_shape", "dense", "snapkv"),
        ),
    }
    records = [
        record(setting, method, phases, sample, 1.0, kv_bytes=500 if phases[2] else 1000)
        for setting, (method, phases) in kinds.items()
        for sample in range(2)
    ]
    panels = kind_panels(summarize(records), setting_kinds(records))
    members = {kind: {r.setting for r in rows} for kind, rows in panels.items()}
    assert list(members) == ["prefill", "decode", "evict"]
    assert members["prefill"] == {
        "dense",
        "xattention[threshold=0.9]",
        "streaming[window=64]",
        "tri_shape;evict=snapkv[compression=0.5]",
    }
    assert members["decode"] == {
        "dense",
        "prefill=dense;decode=quest[budget=64]",
        "streaming[window=64]",
    }
    assert members["evict"] == {
        "dense",
        "evict=snapkv[compression=0.5]",
        "tri_shape;evict=snapkv[compression=0.5]",
    }
    assert all(r.task == "ALL" for rows in panels.values() for r in rows)
    # a panel only for kinds present; records without a phase policy are prefill methods
    only_decode = [r for r in records if r["method"] in ("dense", "dense+quest")]
    assert list(kind_panels(summarize(only_decode), setting_kinds(only_decode))) == ["decode"]
    assert kinds_of({}, "streaming") == ("prefill",) and kinds_of(None, "dense") == ()

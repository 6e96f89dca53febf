"""The frontier on a tiny random model: valid records, resume, refusal of bad input, report."""

from __future__ import annotations

import csv
import statistics

import pytest
import torch

from sparseattn.bench.frontier import FrontierConfig, read_records, run_frontier
from sparseattn.bench.report import write_report
from sparseattn.bench.sweep import TaskSpec, expand_settings, parse_grid_args, parse_task_list
from sparseattn.cli import main
from sparseattn.integration.options import HookOptions
from sparseattn.models import load_model
from sparseattn.setting import Setting, Spec

torch.set_grad_enabled(False)
LENGTH = 700


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


def make_config(**changes) -> FrontierConfig:
    base = dict(
        model="tiny-random-llama",
        settings=[
            Setting(),
            Setting.single("streaming", {"sink": 16, "window": 64, "block_size": 32}),
            Setting(evict=Spec("streaming", {"sink": 16, "window": 64})),
        ],
        tasks=[TaskSpec("niah_single", {"haystack": "noise"}), TaskSpec("fidelity")],
        lengths=[LENGTH],
        samples=2,
        seed=3,
        options=HookOptions(min_length=0),
    )
    return FrontierConfig(**{**base, **changes})


def test_records_resume_and_report(tiny, tmp_path):
    model, tok = tiny
    config = make_config()
    assert run_frontier(config, tmp_path, model, tok, progress=False) == config.total() == 12
    records = read_records(tmp_path / "results.jsonl")
    assert len(records) == 12
    for r in records:
        assert r["length"] == r["n_input_tokens"] == LENGTH
        assert 0.0 <= r["score"] <= 1.0
        for key in (
            "task",
            "sample",
            "method",
            "knobs",
            "phase_policy",
            "prefill_s",
            "peak_memory_mb",
            "kv_bytes",
            "spec",
            "model",
            "versions",
            "seed",
        ):
            assert key in r
    dense = [r for r in records if r["setting"] == "dense"]
    sparse = [r for r in records if r["method"] == "streaming"]
    assert all(r["prefill_density"] == 1.0 for r in dense)
    assert all(0 < r["prefill_density"] < 0.5 for r in sparse)
    fid_dense = [r for r in dense if r["task"] == "fidelity"]
    assert all(
        r["extra"]["kl"] < 1e-6 and r["score"] == pytest.approx(1.0, abs=1e-6) for r in fid_dense
    )
    assert all(r["extra"]["kl"] > 0 for r in sparse if r["task"] == "fidelity")
    evicting = [r for r in records if r["phase_policy"]["evict"] == "streaming"]
    assert len(evicting) == 4 and all(r["method"] == "dense+evict:streaming" for r in evicting)
    by_key = {(r["task"], r["sample"], r["setting"]): r for r in records}
    for r in evicting:
        if r["task"] != "fidelity":  # generated answers: the cache held sink + window only
            dense_bytes = by_key[(r["task"], r["sample"], "dense")]["kv_bytes"]
            assert r["kv_bytes"] < 0.2 * dense_bytes

    # rerunning skips everything; a line cut short by an interrupt is redone, nothing else
    assert run_frontier(config, tmp_path, model, tok, progress=False) == 0
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])
    assert run_frontier(config, tmp_path, model, tok, progress=False) == 1
    assert len(read_records(path)) == 12

    write_report(tmp_path)
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["task"] == "fidelity" and r["setting"] == sparse[0]["setting"])
    expected = statistics.mean(r["score"] for r in sparse if r["task"] == "fidelity")
    assert float(row["score_mean"]) == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.md").exists()


def test_changed_configuration_is_refused_but_more_samples_extend(tiny, tmp_path):
    model, tok = tiny
    one = make_config(samples=1, tasks=[TaskSpec("fidelity")])
    assert run_frontier(one, tmp_path, model, tok, progress=False) == 3
    first = read_records(tmp_path / "results.jsonl")
    more = make_config(samples=3, tasks=[TaskSpec("fidelity")])
    assert run_frontier(more, tmp_path, model, tok, progress=False) == 6  # samples 1 and 2 only
    records = read_records(tmp_path / "results.jsonl")
    assert records[:3] == first  # the finished records are kept as they were
    assert sorted(r["sample"] for r in records) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="different configuration.*seed"):
        run_frontier(
            make_config(samples=3, seed=4, tasks=[TaskSpec("fidelity")]),
            tmp_path,
            model,
            tok,
            progress=False,
        )


def test_bad_input_fails_before_compute(tiny, tmp_path):
    model, tok = tiny
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write to output directory"):
        run_frontier(make_config(), blocker / "out", model, tok, progress=False)
    with pytest.raises(ValueError, match=r"below what task niah_single\[haystack=noise\] needs"):
        run_frontier(make_config(lengths=[20]), tmp_path / "short", model, tok, progress=False)
    assert not (tmp_path / "short" / "results.jsonl").exists()
    no_profile = make_config(settings=[Setting(), Setting.single("minference")])
    with pytest.raises(ValueError, match="no shipped minference profile"):
        run_frontier(no_profile, tmp_path / "noprofile", model, tok, progress=False)
    assert not (tmp_path / "noprofile" / "results.jsonl").exists()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        expand_settings(["dense", "nope"], {})
    with pytest.raises(ValueError, match="unknown knob"):
        expand_settings(["streaming"], parse_grid_args(["streaming.windw=3"]))
    with pytest.raises(ValueError, match="not among the swept methods"):
        expand_settings(["dense"], parse_grid_args(["streaming.window=3"]))
    with pytest.raises(ValueError, match="nope"):
        parse_task_list("nope")


def test_task_list_and_grid_parsing():
    specs = parse_task_list("niah_single:haystack=kv,qa")
    assert [s.label for s in specs] == ["niah_single[haystack=kv]", "qa"]
    settings = expand_settings(
        ["streaming"], parse_grid_args(["streaming.window=64,128", "streaming.sink=0"])
    )
    assert [s.label for s in settings] == [
        "dense",
        "streaming[sink=0,window=64]",
        "streaming[sink=0,window=128]",
    ]
    mixed = expand_settings(
        ["dense"],
        parse_grid_args(["evict:streaming.window=8,16"]),
        evict=["streaming"],
        combos=["prefill=tri_shape[window=64];decode=streaming[window=32];evict=streaming"],
    )
    assert [s.label for s in mixed] == [
        "dense",
        "evict=streaming[window=8]",
        "evict=streaming[window=16]",
        "prefill=tri_shape[window=64];decode=streaming[window=32];evict=streaming",
    ]
    assert mixed[3].phase_policy() == {
        "prefill": "tri_shape",
        "decode": "streaming",
        "evict": "streaming",
    }
    assert Setting.parse(mixed[3].label) == mixed[3]
    # one method for every phase: its label round-trips, as a --setting would give it
    single = Setting.parse("xattention[threshold=0.9]")
    assert single == Setting.single("xattention", {"threshold": 0.9}) and single.is_single
    assert single.label == "xattention[threshold=0.9]" and Setting.parse(single.label) == single
    with pytest.raises(ValueError, match="unknown eviction policy 'nope'"):
        expand_settings(["dense"], {}, evict=["nope"])
    with pytest.raises(ValueError, match="roles are prefill=, decode=, evict="):
        Setting.parse("prefil=dense")


def test_cli_frontier_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "frontier",
        "--model",
        "tiny-random-llama",
        "--methods",
        "dense,strided",
        "--grid",
        "strided.stride=2",
        "--grid",
        "strided.block_size=32",
        "--tasks",
        "fidelity",
        "--lengths",
        "600",
        "--samples",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert len(read_records(out / "results.jsonl")) == 2
    assert {"summary.csv", "report.md", "report.html", "config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert main(args) == 0  # the same command again resumes: nothing new
    assert len(read_records(out / "results.jsonl")) == 2
    bad = [a if a != "fidelity" else "fidelity:nope=1" for a in args]
    assert main(bad) == 2
    assert "nope" in capsys.readouterr().err


def test_prefill_reuse_gives_the_records_of_recomputation(tiny):
    """Settings that run the prompt as dense does decode from one dense prefill's cache (copied
    per setting): the same answers, scores, densities and KV bytes as prefilling each time."""
    from sparseattn.bench.runner import SampleRunner
    from sparseattn.bench.tasks import build_task

    model, tok = tiny
    task = build_task("niah_single", haystack="noise")
    sample = task.generate(tok, LENGTH, 3, 0)
    settings = [
        Setting(),
        Setting.single("quest", {"budget": 64, "full_layers": 0}),
        Setting(decode=Spec("tokenselect", {"budget": 48, "window": 8})),
        Setting.single("streaming", {"sink": 16, "window": 64, "block_size": 32}),
        Setting(evict=Spec("streaming", {"sink": 8, "window": 40})),
        Setting(evict=Spec("snapkv", {"window": 8, "compression": 0.5})),
    ]
    options = HookOptions(min_length=0)
    reused = SampleRunner(model, tok, sample, options)
    fresh = SampleRunner(model, tok, sample, options, reuse_prefill=False)
    for setting in settings:
        a, b = reused.run(setting, task), fresh.run(setting, task)
        # eviction that keeps what it keeps of a dense prompt reuses it; SnapKV needs the queries
        snapkv = setting.evict is not None and setting.evict.name == "snapkv"
        expected = setting.prefill.name != "streaming" and not snapkv
        assert a["prefill_reused"] == expected, setting.label
        assert not b["prefill_reused"]
        for key in ("answer", "score", "prefill_density", "decode_density", "kv_bytes"):
            assert a[key] == b[key], (setting.label, key)
        assert a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-4)
    assert 0 < reused.run(settings[1], task)["decode_density"] < 1  # quest was sparse


def test_answer_logprob_is_the_teacher_forced_likelihood(tiny):
    """Through the hook's prefill and decode steps it equals one plain forward over prompt +
    answer; dense against dense differs by exactly 0 per sample."""
    from sparseattn.bench.runner import SampleRunner
    from sparseattn.bench.tasks import build_task

    model, tok = tiny
    task = build_task("niah_single", haystack="noise")
    sample = task.generate(tok, LENGTH, 3, 1)
    runner = SampleRunner(model, tok, sample, HookOptions(min_length=0))
    answer = runner.answer_ids()
    assert answer
    first, second = runner.run(Setting(), task), runner.run(Setting(), task)
    assert first["answer_logprob"] - second["answer_logprob"] == 0.0
    ids = torch.tensor([list(sample.input_ids) + answer])
    logits = model(input_ids=ids).logits[0, len(sample.input_ids) - 1 : -1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).sum()
    assert first["answer_logprob"] == pytest.approx(float(expected), abs=1e-3)
    fresh = SampleRunner(model, tok, sample, HookOptions(min_length=0), reuse_prefill=False)
    assert fresh.run(Setting(), task)["answer_logprob"] == pytest.approx(
        first["answer_logprob"], abs=1e-4
    )


def test_default_method_list_leaves_out_methods_that_cannot_bind(capsys):
    """A frontier over every registered method leaves out, by name and with the reason, those
    whose trained file does not exist for the model (seer's gates for a random tiny model)."""
    from conftest import make_model

    from sparseattn.cli.frontier import bindable
    from sparseattn.setting import Setting

    model = make_model("llama")
    settings = [Setting.single("seer"), Setting.single("xattention"), Setting()]
    kept = bindable(settings, model.config)
    assert [s.label for s in kept] == [settings[1].label, settings[2].label]
    err = capsys.readouterr().err
    assert "seer" in err and "left out" in err

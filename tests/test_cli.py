"""The command line: methods listing, generate, kernel benchmark records."""

from __future__ import annotations

import argparse
import json

import pytest

import sparseattn
from sparseattn.cli import main, min_length_arg, parse_knobs, parse_lengths
from sparseattn.errors import UsageError


def test_methods_json_lists_every_method_with_knobs(capsys):
    assert main(["methods", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in infos if i["kind"] == "method"] == sparseattn.list_methods()
    assert [i["name"] for i in infos if i["kind"] == "eviction"] == sparseattn.list_policies()
    evicting = next(i for i in infos if i["kind"] == "eviction" and i["name"] == "streaming")
    assert {k["name"] for k in evicting["knobs"]} == {"sink", "window", "rerotate"}
    streaming = next(i for i in infos if i["name"] == "streaming")
    window = next(k for k in streaming["knobs"] if k["name"] == "window")
    assert window["default"] == 1024 and window["min"] == 1
    assert streaming["paper"] and "decode" in streaming["phases"]
    oracle = next(i for i in infos if i["name"] == "oracle")
    assert oracle["speedup"] is False


def test_methods_text(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "--knob window=1024" in out and "analysis only" in out
    assert "eviction policy (--evict)" in out and "--evict-knob rerotate=False" in out


def test_parsers():
    assert parse_lengths("4k,8k,1000") == [4096, 8192, 1000]
    assert parse_knobs(["window=512", "top_p=0.9", "profile=none", "name=x"]) == {
        "window": 512,
        "top_p": 0.9,
        "profile": None,
        "name": "x",
    }
    with pytest.raises(UsageError, match="bad length '4q'"):
        parse_lengths("4q")
    assert min_length_arg("auto") == "auto" and min_length_arg("2048") == 2048
    with pytest.raises(argparse.ArgumentTypeError, match="'often': give an integer >= 0 or 'auto'"):
        min_length_arg("often")


def test_generate_with_tiny_model(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code = main(
        [
            "generate",
            "--model",
            "tiny-random-llama",
            "--method",
            "streaming",
            "--knob",
            "window=32",
            "--knob",
            "sink=0",
            "--knob",
            "block_size=32",
            "--min-length",
            "0",
            "--prompt-file",
            str(prompt),
            "--max-new-tokens",
            "3",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["prompt_tokens"] > 300
    assert 0 < summary["prefill"]["density"] < 0.6  # window 32 over a 400-token prompt


def test_generate_bad_method_is_a_clear_error(tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-random-llama",
                "--method",
                "nope",
                "--prompt-file",
                str(prompt),
            ]
        )
        == 2
    )
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_bench_kernel_records(capsys):
    assert (
        main(
            [
                "bench",
                "kernel",
                "--json",
                "--lengths",
                "512",
                "--densities",
                "0.3",
                "--repeats",
                "1",
                "--compile-lengths",
                "300,400",
                "--block-size",
                "64",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    compile_info, *records = lines
    assert compile_info["kind"] == "compile" and compile_info["compiled_graphs"] <= 1
    assert [r["kernel"] for r in records] == ["cpp", "flex"]  # auto picks cpp here, then flex
    for record in records:
        for key in ("length", "density", "dense_s", "kernel_dense_s", "sparse_s", "efficiency"):
            assert key in record
        # figures are rounded to 3 decimals: compare within that rounding
        assert record["speedup"] == pytest.approx(
            record["dense_s"] / record["sparse_s"], rel=0.01, abs=2e-3
        )
        assert record["ideal_speedup"] == pytest.approx(1 / record["density"], rel=0.01)
        assert record["efficiency"] == pytest.approx(  # both rounded to 3 decimals
            record["speedup"] * record["density"], rel=0.01, abs=2e-3
        )
        assert record["dense_ratio"] == pytest.approx(
            record["dense_s"] / record["kernel_dense_s"], rel=0.01, abs=2e-3
        )
        assert 0 < record["density"] < 1
    assert records[0]["density"] == records[1]["density"]  # the same tiles for both kernels


def test_bench_kernel_refuses_unknown_kernels(capsys):
    assert main(["bench", "kernel", "--kernels", "cpp,triton"]) == 2
    assert "--kernels 'cpp,triton'" in capsys.readouterr().err


def test_bench_decode_records(capsys):
    assert (
        main(
            [
                "bench",
                "decode",
                "--json",
                "--model",
                "tiny-random-llama",
                "--method",
                "streaming",
                "--knob",
                "sink=0",
                "--knob",
                "window=64",
                "--knob",
                "block_size=32",
                "--lengths",
                "600",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["speedup_vs_dense_hook"] == pytest.approx(
        record["dense_hook_s_per_token"] / record["setting_s_per_token"], rel=0.01
    )
    assert record["speedup_vs_sdpa"] == pytest.approx(
        record["own_sdpa_s_per_token"] / record["setting_s_per_token"], rel=0.01
    )
    assert 0 < record["decode_density"] < 0.3  # ~96 of ~600 keys per step
    assert record["kv_ratio"] == 1.0  # a decode selection keeps every key


def test_bench_decode_eviction_records(capsys):
    args = ["bench", "decode", "--json", "--model", "tiny-random-llama", "--method", "dense"]
    args += ["--evict", "streaming", "--evict-knob", "sink=4", "--evict-knob", "window=60"]
    args += ["--lengths", "600", "--steps", "2", "--batch", "1", "2"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["batch"] for r in records] == [1, 2]
    for r in records:
        assert r["setting"] == "evict=streaming[sink=4,window=60]"
        assert r["kept_tokens"] == 64 and r["decode_density"] == 1.0
        assert r["kv_ratio"] == pytest.approx(r["kv_bytes"] / r["kv_bytes_dense"], abs=1e-4)
        assert r["kv_ratio"] < 0.15
        assert r["ceiling_tokens"] == 64
        assert r["peak_mb_setting"] > 0  # CPU: the process's peak resident set


def test_bench_decode_several_settings_share_one_dense_reference(capsys):
    args = ["bench", "decode", "--json", "--model", "tiny-random-llama", "--lengths", "600"]
    args += ["--steps", "2", "--setting", "evict=streaming[sink=4,window=60]"]
    args += ["--setting", "evict=streaming[sink=4,window=124]"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kept_tokens"] for r in records] == [64, 128]
    assert len({r["dense_hook_s_per_token"] for r in records}) == 1  # measured once
    assert len({r["kv_bytes_dense"] for r in records}) == 1
    assert records[0]["kv_bytes"] < records[1]["kv_bytes"]


def test_several_settings_only_for_bench_decode(capsys):
    args = ["bench", "prefill", "--model", "tiny-random-llama", "--lengths", "300"]
    args += ["--setting", "prefill=streaming", "--setting", "prefill=dense"]
    assert main(args) == 2
    assert "--setting given 2 times" in capsys.readouterr().err


def test_bench_recall_records(capsys, tmp_path):
    plot = tmp_path / "recall.png"
    assert (
        main(
            [
                "bench",
                "recall",
                "--json",
                "--model",
                "tiny-random-llama",
                "--method",
                "oracle,xattention",
                "--grid",
                "oracle.top_p=0.5,1.0",
                "--grid",
                "oracle.block_size=32",
                "--grid",
                "xattention.block_size=32",
                "--grid",
                "xattention.threshold=0.9",
                "--lengths",
                "300",
                "--layers",
                "1",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    by_setting = {r["setting"]: r for r in records}
    assert by_setting["oracle[block_size=32,top_p=1.0]"]["recall"] == pytest.approx(1.0)
    assert by_setting["oracle[block_size=32,top_p=1.0]"]["density"] == pytest.approx(1.0)
    assert by_setting["oracle[block_size=32,top_p=1.0]"]["recall_last"] == pytest.approx(1.0)
    assert all(0 <= r["recall_last"] <= 1 + 1e-6 for r in records)
    assert by_setting["oracle[block_size=32,top_p=0.5]"]["recall"] >= 0.5
    assert all(r["layer"] == 1 and 0 < r["density"] <= 1 for r in records)


def test_bench_recall_on_decode_steps(capsys):
    """Decode selections scored on real decode steps: the exact top-k reads the most mass any
    k tokens per head can hold (here at least TokenSelect's k per KV head and Quest's pages),
    a budget covering the cache is dense, and prefill-only methods are refused by name."""
    args = ["bench", "recall", "--json", "--model", "tiny-random-llama", "--phase", "decode"]
    args += ["--lengths", "300", "--steps", "3", "--layers", "0", "1"]
    grid = ["--grid", "decode_oracle.budget=64,1000", "--grid", "tokenselect.budget=64"]
    grid += ["--grid", "tokenselect.reuse_threshold=2.0", "--grid", "quest.budget=64"]
    grid += ["--grid", "quest.full_layers=0"]
    assert main([*args, "--method", "decode_oracle,tokenselect,quest", *grid]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {r["phase"] for r in records} == {"decode"} and {r["layer"] for r in records} == {0, 1}
    by = {(r["setting"], r["layer"]): r for r in records}
    for layer in (0, 1):
        oracle = by[("decode_oracle[budget=64]", layer)]
        assert by[("decode_oracle[budget=1000]", layer)]["recall"] == pytest.approx(1.0)
        assert by[("decode_oracle[budget=1000]", layer)]["density"] == pytest.approx(1.0)
        assert oracle["density"] == pytest.approx(64 / 301, abs=0.01)
        for other in (
            "tokenselect[budget=64,reuse_threshold=2.0]",
            "quest[budget=64,full_layers=0]",
        ):
            assert 0 < by[(other, layer)]["recall"] <= oracle["recall"] + 1e-6
    assert main([*args, "--method", "xattention"]) == 2
    assert "select(s) only at prefill" in capsys.readouterr().err


def test_profile_command_writes_a_loadable_profile(tmp_path, capsys):
    from sparseattn.profiles import load_profile

    out = tmp_path / "tiny-xattention.json"
    args = ["profile", "--model", "tiny-random-llama", "--kind", "xattention"]
    assert main([*args, "--lengths", "512", "--block-size", "64", "--out", str(out)]) == 0
    profile = load_profile(str(out), "xattention")
    assert profile.model["id"] == "tiny-random-llama"
    assert profile.calibration["lengths"] == [512] and profile.calibration["block_size"] == 64
    assert "target recall 0.9: mean recall" in capsys.readouterr().err
    # bad arguments fail before the model is loaded
    assert main([*args, "--out", str(tmp_path / "p.txt")]) == 2
    assert "must name a .json file" in capsys.readouterr().err
    assert main([*args, "--lengths", "100", "--out", str(out)]) == 2
    assert "at least 256 tokens" in capsys.readouterr().err


def test_profile_command_writes_a_channels_profile_double_sparsity_runs_with(tmp_path, capsys):
    from sparseattn.models import tiny_random_llama
    from sparseattn.profiles import load_profile

    out = tmp_path / "tiny-channels.json"
    args = ["profile", "--model", "tiny-random-llama", "--kind", "channels", "--lengths", "512"]
    assert main([*args, "--samples", "1", "--seed", "3", "--out", str(out)]) == 0
    profile = load_profile(str(out), "channels")
    assert profile.model["id"] == "tiny-random-llama" and profile.model["head_dim"] == 16
    assert profile.calibration["lengths"] == [512] and profile.calibration["seed"] == 3
    assert [len(table) for table in profile.heads[0.0]] == [2, 2]  # 2 layers x 2 KV heads
    assert (
        "top 16 channels: mean share of |q.k| channel importance 1.000" in capsys.readouterr().err
    )
    method = sparseattn.build_method("double_sparsity", channels=4, budget=64, profile=str(out))
    method.bind(tiny_random_llama(vocab_size=128).config)  # made for this architecture: accepted


def test_recall_curve_families_and_plot_errors(capsys):
    from sparseattn.bench.plots import _family

    assert (
        _family("xattention", "xattention[profile=auto,threshold=0.9]") == "xattention profile=auto"
    )
    assert _family("xattention", "xattention[profile=,threshold=0.9]") == "xattention"
    assert _family("oracle", "oracle[block_size=32,top_p=0.5]") == "oracle"
    with pytest.raises(SystemExit) as exit_:  # bench prefill has no --plot: argparse refuses it
        main(["bench", "prefill", "--plot", "x.png"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --plot x.png" in capsys.readouterr().err
    assert main(["bench", "recall", "--plot", "x.pdf"]) == 2
    assert "must name a .png file" in capsys.readouterr().err


def test_only_bad_input_becomes_a_one_line_error(monkeypatch, capsys):
    """A UsageError prints `error: ...` and exits 2; any other ValueError is a bug: traceback."""
    from sparseattn import cli

    def bug(args):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(cli.methods, "run", bug)
    with pytest.raises(ValueError, match="a bug, not bad input"):
        main(["methods"])

    def bad_input(args):
        raise UsageError("--thing 3 must be even")

    monkeypatch.setattr(cli.methods, "run", bad_input)
    assert main(["methods"]) == 2
    assert capsys.readouterr().err == "error: --thing 3 must be even\n"


TINY = "tiny-random-llama"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate"], "give --prompt-file FILE or --prompt TEXT"),
        (["generate", "--model", "nowhere/model.gguf", "--prompt", "hi"], "GGUF file not found"),
        (["generate", "--model", TINY, "--prompt", "hi", "--knob", "window"], "name=value"),
        (["generate", "--model", TINY, "--prompt", "hi", "--method", "nope"], "unknown method"),
        (["bench", "kernel", "--lengths", "4q"], "bad length '4q'"),
        (["bench", "kernel", "--densities", "0.1,x"], "--densities '0.1,x'"),
        (["report", "/nowhere/run"], "results.jsonl not found"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_prefill_records_hook_dense_and_crossover(capsys):
    args = ["bench", "prefill", "--json", "--model", "tiny-random-llama", "--method", "streaming"]
    args += ["--knob", "sink=0", "--knob", "window=64", "--knob", "block_size=32"]
    args += ["--lengths", "300,600", "--repeats", "1"]
    assert main(args) == 0
    *records, summary = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["length"] for r in records] == [300, 600]
    for r in records:
        # (ratios of unrounded times; the seconds are rounded to 0.1 ms)
        assert r["speedup"] == pytest.approx(r["dense_s"] / r["sparse_s"], rel=0.05)
        assert r["speedup_vs_hook_dense"] == pytest.approx(
            r["hook_dense_s"] / r["sparse_s"], rel=0.05
        )
        assert 0 < r["density"] < 1 and r["prefill_backend"] == "auto"
    assert summary["kind"] == "crossover" and summary["lengths"] == [300, 600]
    assert summary["speedups"] == [r["speedup"] for r in records]


def test_crossover_length_is_the_first_length_that_stays_faster():
    from sparseattn.bench.prefill import crossover_length

    assert crossover_length([1000, 2000, 4000, 8000], [0.8, 1.1, 0.99, 1.3]) == 8000
    assert crossover_length([4000, 1000, 2000], [1.2, 0.9, 1.05]) == 2000
    assert crossover_length([1000, 2000], [0.5, 0.9]) is None
    assert crossover_length([1000], [1.0]) == 1000


def test_profile_command_writes_a_moa_profile(tmp_path, capsys):
    from sparseattn.profiles import load_profile

    out = tmp_path / "tiny-moa.json"
    args = ["profile", "--model", "tiny-random-llama", "--kind", "moa", "--lengths", "384,512"]
    args += ["--moa-sink", "16", "--response-tokens", "8", "--out", str(out)]
    assert main(args) == 0
    profile = load_profile(str(out), "moa")
    assert profile.calibration["lengths"] == [384, 512] and profile.calibration["sink"] == 16
    assert profile.levels == (0.1, 0.25, 0.5, 0.75)
    assert [len(row) for row in profile.heads[0.25]] == [2, 2]  # 2 layers x 2 KV heads
    err = capsys.readouterr().err
    assert "[6/6] qa@512#0" in err and "budget 0.25: mean kept share" in err


def test_profile_command_writes_a_retrieval_profile(tmp_path, capsys):
    from sparseattn.profiles import load_profile

    out = tmp_path / "tiny-retrieval.json"
    args = ["profile", "--model", "tiny-random-llama", "--kind", "retrieval", "--lengths", "512"]
    assert main([*args, "--samples", "2", "--seed", "1", "--out", str(out)]) == 0
    profile = load_profile(str(out), "retrieval")
    assert profile.calibration["prompts"] == 2 and profile.calibration["seed"] == 1
    assert [len(row) for row in profile.heads[0.0]] == [4, 4]  # 2 layers x 4 query heads
    copied = profile.calibration["copied_tokens"]
    err = capsys.readouterr().err
    assert f"copied needle tokens: {copied} in 2 prompts" in err
    assert "heads scoring >= 0.3: " in err


def test_bench_memory_prompt_sweep_records_and_plot(capsys, tmp_path):
    """A comma list of prompt lengths measures peak memory and KV bytes per length; a chunked
    SnapKV setting keeps the budget of the tokens seen, whatever the prompt length."""
    plot = tmp_path / "memory.png"
    args = ["bench", "memory", "--json", "--model", "tiny-random-llama", "--tokens", "2"]
    args += ["--prompt-tokens", "128,256", "--plot", str(plot)]
    args += ["--setting", "evict=snapkv[compression=0.5,window=8];chunk=64"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt_tokens"] for r in records] == [128, 256]
    assert {r["setting"] for r in records} == {"evict=snapkv[compression=0.5,window=8];chunk=64"}
    held = [r["kv_held_bytes"] for r in records]
    assert held[1] / held[0] == pytest.approx((128 + 2) / (64 + 2))  # half of each prompt kept
    assert all(r["peak_added_mb"] is not None for r in records)
    assert plot.exists()

"""``sparseattn profile --show``: the printed per-layer x per-head map of every kind, the PNG,
and the new kinds' validation on load."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparseattn.cli import main
from sparseattn.errors import UsageError
from sparseattn.profiles import load_profile, save_profile
from sparseattn.profiles.show import show_profile

DATA = Path(__file__).parent / "data"
MODEL = {"id": "hand-made", "model_type": "llama", "num_hidden_layers": 2}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(tmp_path, kind, heads, *, choices=None, summary=None, calibration=None, **model):
    path = tmp_path / f"{kind}.json"
    save_profile(
        path,
        kind=kind,
        model={**MODEL, **model},
        calibration=calibration or {"lengths": [1024]},
        heads=heads,
        summary=summary or {},
        choices=choices,
    )
    return path


def test_retrieval_map_and_heatmap(tmp_path):
    path = _write(
        tmp_path,
        "retrieval",
        {0.0: [[0.0, 0.25, 1.0], [0.5, 0.0, 0.125]]},
        num_attention_heads=3,
    )
    png = tmp_path / "map.png"
    text = show_profile(str(path), png)
    assert text.splitlines()[2:] == [
        "retrieval score per query head",
        "layer   h0   h1   h2",
        "    0 0.00 0.25 1.00",
        "    1 0.50 0.00 0.12",
    ]
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_moa_map_shows_each_heads_span_at_the_longest_profiled_length(tmp_path):
    rules = [
        {"alpha": 64, "beta": 0.0, "sink": 64},
        {"alpha": 0, "beta": 0.25, "sink": 64},
        {"alpha": 0, "beta": 1.0, "sink": 64},
    ]
    path = _write(
        tmp_path,
        "moa",
        {0.1: [[0], [1]], 0.5: [[2], [1]]},
        choices=rules,
        calibration={"lengths": [1024, 2048]},
        num_key_value_heads=1,
    )
    text = show_profile(str(path), tmp_path / "moa.png")
    blocks = text.split("\n\n")[1:]
    assert blocks[0].splitlines()[0].startswith("budget 0.1 (kept share of the KV cache)")
    assert blocks[0].splitlines()[2:] == ["    0  64", "    1 512"]
    assert blocks[1].splitlines()[2:] == ["    0 2048", "    1  512"]


def test_minference_map_letters_and_sizes():
    text = show_profile(str(DATA / "minference-contract.json"), Path("/dev/null"))
    blocks = text.split("\n\n")[1:]
    assert blocks[0].splitlines()[1:] == ["layer  h0  h1  h2  h3", "    0 A64 V16  B2  B4"]
    assert blocks[1].splitlines()[1:] == ["layer  h0  h1  h2  h3", "    0  B4  B4 V16 A64"]


def test_channels_map_per_head_shares_or_the_layer_mean(tmp_path):
    ranking = [list(range(16)), list(range(16))[::-1]]
    path = _write(
        tmp_path,
        "channels",
        {0.0: [ranking, ranking]},
        summary={16.0: {"share": [0.9, 0.6], "head_share": [[1.0, 0.8], [0.5, 0.7]]}},
        num_key_value_heads=2,
        head_dim=16,
    )
    text = show_profile(str(path), tmp_path / "c.png")
    assert text.splitlines()[-2:] == ["    0 1.00 0.80", "    1 0.50 0.70"]
    older = _write(
        tmp_path,
        "channels",
        {0.0: [ranking, ranking]},
        summary={16.0: {"share": [0.9, 0.6]}},  # written before per-head shares were stored
        num_key_value_heads=2,
        head_dim=16,
    )
    text = show_profile(str(older), tmp_path / "c.png")
    assert text.splitlines()[-3:-1] == ["    0 0.90 0.90", "    1 0.60 0.60"]
    assert "each cell is its layer's mean" in text.splitlines()[-1]
    none = show_profile(str(DATA / "channels-contract.json"), tmp_path / "none.png")
    assert "stores no share for the top 16 channels" in none


def test_duo_gates_and_their_range(tmp_path):
    path = _write(tmp_path, "duo", {0.0: [[1.0, 0.0], [0.3, 0.9]]}, num_key_value_heads=2)
    text = show_profile(str(path), tmp_path / "duo.png")
    assert text.splitlines()[-2:] == ["    0 1.00 0.00", "    1 0.30 0.90"]
    assert load_profile(str(path), "duo").heads[0.0] == [[1.0, 0.0], [0.3, 0.9]]
    bad = _write(tmp_path, "duo", {0.0: [[1.5, 0.0], [0.3, 0.9]]}, num_key_value_heads=2)
    with pytest.raises(UsageError, match="duo value 1.5 is outside \\[0, 1\\]"):
        load_profile(str(bad), "duo")
    short = _write(tmp_path, "duo", {0.0: [[1.0, 0.0]]}, num_key_value_heads=2)
    with pytest.raises(UsageError, match="1 rows; one per layer \\(2\\)"):
        load_profile(str(short), "duo")


def test_retrieval_profile_refuses_a_second_level(tmp_path):
    path = _write(tmp_path, "retrieval", {0.0: [[0.1], [0.2]], 0.5: [[0.1], [0.2]]})
    with pytest.raises(UsageError, match="holds one level, 0"):
        load_profile(str(path), "retrieval")


def test_profile_show_command(tmp_path, capsys):
    png = tmp_path / "mi.png"
    assert main(["profile", "--show", "smollm2-135m-xattention", "--png", str(png)]) == 0
    captured = capsys.readouterr()
    assert "target recall 0.9: threshold per head" in captured.out
    assert len([line for line in captured.out.splitlines() if line.startswith("   29 ")]) == 4
    assert f"heatmap: {png}" in captured.err
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--show", "x.json", "--kind", "moa"], "cannot be combined with --kind"),
        (["--show", "x.json", "--out", "y.json"], "cannot be combined with --out"),
        (["--kind", "moa"], "needs --kind K and --out FILE.json"),
        ([], "needs --kind K and --out FILE.json to make a profile, or --show FILE"),
        (["--kind", "moa", "--out", "p.json", "--png", "m.png"], "--png goes with --show"),
        (["--show", "no-such-profile"], "neither a .json file nor a shipped profile"),
        (["--show", "smollm2-135m-minference", "--png", "m.pdf"], "must name a .png file"),
        (["--kind", "moa", "--out", "p.json", "--lengths", "2k"], "needs at least two lengths"),
    ],
)
def test_profile_arguments_are_checked(argv, message, capsys):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err

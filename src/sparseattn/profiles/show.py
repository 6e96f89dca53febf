"""``sparseattn profile --show``: a profile as a per-layer x per-head map, in text and as a PNG.

What a cell holds, per kind: minference, the head's pattern letter and size (A = A-shape
window, V = vertical-slash lines, B = block-sparse top tiles); xattention, its threshold;
channels, the share of its |q.k| channel importance the top 16 channels hold; retrieval, its
retrieval score; duo, its gate; moa, its span in tokens at the longest profiled length. One
map per stored level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .profile import KINDS, Profile, load_profile, resolve, span_at

CHANNELS_SHOWN = 16  # channels: the share of the top this many channels
_PATTERN_LETTERS = {"streaming": "A", "vertical_slash": "V", "block_sparse": "B"}
_PATTERN_SIZE = {"streaming": "window", "vertical_slash": "vertical_size", "block_sparse": "top_k"}


@dataclass(frozen=True)
class HeadMap:
    """One level of a profile, one cell per (layer, head).

    Attributes:
        title: What the level is and what a cell holds.
        text: text[layer][head], what the printed map shows.
        values: values[layer][head], the number the heatmap colours (a pattern's family index
            for minference).
        note: An extra line (how values were derived), or "".
    """

    title: str
    text: list[list[str]]
    values: list[list[float]]
    note: str = ""


def _minference(profile: Profile, level: float) -> HeadMap:
    text, values = [], []
    families = list(_PATTERN_LETTERS)
    for row in profile.heads[level]:
        choices = [profile.choices[i] for i in row]
        text.append(
            [
                _PATTERN_LETTERS[c["pattern"]] + str(c["knobs"][_PATTERN_SIZE[c["pattern"]]])
                for c in choices
            ]
        )
        values.append([float(families.index(c["pattern"])) for c in choices])
    return HeadMap(
        f"budget {level:g}: pattern and size (A = A-shape window, V = vertical-slash lines, "
        "B = block-sparse top tiles)",
        text,
        values,
    )


def _channels(profile: Profile, level: float) -> HeadMap:
    r = float(CHANNELS_SHOWN)
    stats = profile.summary.get(r, {})
    table = profile.heads[level]
    if "head_share" in stats:
        values = [[float(v) for v in row] for row in stats["head_share"]]
        note = ""
    else:  # profiles written before per-head shares were stored
        values = [[float(v)] * len(row) for v, row in zip(stats.get("share", []), table)]
        note = "per-head shares not stored in this profile: each cell is its layer's mean"
    if len(values) != len(table):
        values = [[0.0] * len(row) for row in table]
        note = f"this profile stores no share for the top {CHANNELS_SHOWN} channels"
    text = [[f"{v:.2f}" for v in row] for row in values]
    return HeadMap(
        f"share of |q.k| channel importance in each KV head's top {CHANNELS_SHOWN} channels",
        text,
        values,
        note,
    )


def _moa(profile: Profile, level: float) -> HeadMap:
    longest = max(profile.calibration.get("lengths") or [4096])
    spans = [[span_at(profile.choices[i], longest) for i in row] for row in profile.heads[level]]
    return HeadMap(
        f"budget {level:g} (kept share of the KV cache): span in tokens at {longest} tokens "
        "(the rule's alpha + beta * N; the sink is kept besides)",
        [[str(s) for s in row] for row in spans],
        [[s / longest for s in row] for row in spans],
    )


def _values(profile: Profile, level: float, title: str) -> HeadMap:
    table = [[float(v) for v in row] for row in profile.heads[level]]
    return HeadMap(title, [[f"{v:.2f}" for v in row] for row in table], table)


def head_maps(profile: Profile) -> list[HeadMap]:
    """One HeadMap per stored level of ``profile``."""
    maps = []
    for level in profile.levels:
        if profile.kind == "minference":
            maps.append(_minference(profile, level))
        elif profile.kind == "channels":
            maps.append(_channels(profile, level))
        elif profile.kind == "moa":
            maps.append(_moa(profile, level))
        elif profile.kind == "xattention":
            maps.append(_values(profile, level, f"target recall {level:g}: threshold per head"))
        elif profile.kind == "retrieval":
            maps.append(_values(profile, level, "retrieval score per query head"))
        else:  # duo
            maps.append(_values(profile, level, "gate per KV head (1 = retrieval, full KV)"))
    return maps


def format_map(head_map: HeadMap) -> str:
    """The map as text: one line per layer, one right-aligned column per head."""
    n_heads = max((len(row) for row in head_map.text), default=0)
    width = max([len(c) for row in head_map.text for c in row] + [len(f"h{n_heads - 1}")])
    header = "layer " + " ".join(f"h{h}".rjust(width) for h in range(n_heads))
    lines = [head_map.title, header]
    for layer, row in enumerate(head_map.text):
        lines.append(f"{layer:>5} " + " ".join(c.rjust(width) for c in row))
    if head_map.note:
        lines.append(f"({head_map.note})")
    return "\n".join(lines)


def write_heatmap(profile: Profile, maps: list[HeadMap], path: Path) -> None:
    """One heatmap per level side by side (layers down, heads across), cells annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    n_layers = len(maps[0].values)
    n_heads = max(len(row) for row in maps[0].values)
    width = max(3.0, 0.45 * n_heads + 1.5)
    fig, axes = plt.subplots(
        1, len(maps), figsize=(width * len(maps), max(3.0, 0.25 * n_layers + 1.5)), squeeze=False
    )
    categorical = profile.kind == "minference"
    cmap = ListedColormap(["tab:blue", "tab:orange", "tab:green"]) if categorical else "viridis"
    for ax, head_map, level in zip(axes[0], maps, profile.levels):
        limits = {"vmin": 0, "vmax": 2} if categorical else {}
        if profile.kind in ("retrieval", "duo", "channels", "moa"):
            limits = {"vmin": 0.0, "vmax": 1.0}
        image = ax.imshow(head_map.values, aspect="auto", cmap=cmap, **limits)
        if n_layers * n_heads <= 600:
            for layer, row in enumerate(head_map.text):
                for head, cell in enumerate(row):
                    ax.text(head, layer, cell, ha="center", va="center", fontsize=5, color="w")
        label = "" if profile.kind in ("retrieval", "duo", "channels") else f"level {level:g}"
        ax.set_title(f"{profile.model.get('id', '?')} {profile.kind} {label}".strip(), fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if categorical:
            from matplotlib.patches import Patch

            names = ("A-shape", "vertical-slash", "block-sparse")
            legend = [Patch(color=cmap(i), label=n) for i, n in enumerate(names)]
            ax.legend(handles=legend, fontsize=6, loc="upper right", framealpha=0.8)
        else:
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show_profile(name_or_path: str, png: Path) -> str:
    """The printed maps of a profile of any kind (its kind read from the file); writes ``png``.

    Raises:
        UsageError: not a profile, or a malformed one.
    """
    import json

    from ..errors import UsageError

    path = resolve(name_or_path)
    try:
        kind = json.loads(path.read_text()).get("kind")
    except (json.JSONDecodeError, AttributeError):
        kind = None
    if kind not in KINDS:
        raise UsageError(f"{path} is not a sparseattn profile of a known kind ({', '.join(KINDS)})")
    profile = load_profile(str(path), kind)
    maps = head_maps(profile)
    write_heatmap(profile, maps, png)
    head = f"{path}: {kind} profile of {profile.model.get('id', '?')}"
    return "\n\n".join([head, *(format_map(m) for m in maps)])

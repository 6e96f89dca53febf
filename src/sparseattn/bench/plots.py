"""PNG plots of the frontier: score vs each kind of setting's own density (prefill density,
decode density, KV share), vs prefill speedup and vs decode speedup, and a setting x length
heatmap."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .summary import SummaryRow  # noqa: E402


def _overall(rows: list[SummaryRow]) -> list[SummaryRow]:
    return [r for r in rows if r.task == "ALL"]


_MARKERS = "osD^vP<>Xh"


def _label_inches(labels) -> float:
    """About how wide the longest of ``labels`` is at fontsize 8, in inches."""
    return 0.065 * max((len(label) for label in labels), default=0)


def _style(index: int) -> dict:
    """Colour and marker of the index-th curve: 20 colours x 10 markers, so a grid with many
    method families still tells its curves apart."""
    return {"color": plt.get_cmap("tab20")(index % 20), "marker": _MARKERS[index % len(_MARKERS)]}


KINDS = {  # kind of setting: (the SummaryRow field on the x axis, its label)
    "prefill": ("prefill_density_mean", "measured prefill density"),
    "decode": ("decode_density_mean", "decode density (share of cached tokens read)"),
    "evict": ("kv_share", "KV share (KV bytes / dense's)"),
}
PLOTS_LEGEND = (
    "`score_vs_density.png`: one column per kind of setting, one row per length: prefill "
    "methods against measured prefill density, decode methods against decode density (the "
    "share of cached tokens a step reads), eviction policies against KV share; a setting "
    "that is several kinds (a method that runs both phases, or one combined with eviction) "
    "appears in each of its panels; dense is the star. Error bars: the interval of the table "
    "cells. The speedup plots put every setting against its speedup."
)


def kinds_of(phase_policy: dict | None, method: str = "") -> tuple[str, ...]:
    """The kinds of a setting from its record's ``phase_policy``: "prefill" / "decode" when
    that phase runs a method other than dense, "evict" when a policy evicts; () for dense.
    Records without a phase policy count as prefill methods (unless dense)."""
    if not phase_policy:
        return () if method == "dense" else ("prefill",)
    kinds = [k for k in ("prefill", "decode") if phase_policy.get(k) not in (None, "dense")]
    return (*kinds, "evict") if phase_policy.get("evict") is not None else tuple(kinds)


def setting_kinds(records: list[dict]) -> dict[str, tuple[str, ...]]:
    """{setting: its kinds} from the records' ``phase_policy``."""
    return {r["setting"]: kinds_of(r.get("phase_policy"), r["method"]) for r in records}


def kind_panels(
    rows: list[SummaryRow], kinds: dict[str, tuple[str, ...]] | None = None
) -> dict[str, list[SummaryRow]]:
    """{kind: the pooled rows drawn in its panel}, in ``KINDS`` order, only kinds some setting
    has; dense joins every panel as the reference. A setting missing from ``kinds`` counts as
    a prefill method (``kinds_of`` without a phase policy)."""
    kinds = kinds or {}
    overall = _overall(rows)
    panels: dict[str, list[SummaryRow]] = {}
    for kind in KINDS:
        members = [r for r in overall if kind in kinds.get(r.setting, kinds_of(None, r.method))]
        if members:
            panels[kind] = [r for r in overall if r.setting == "dense"] + members
    return panels


def _x(row: SummaryRow, x_field: str) -> float:
    """``row``'s value on the x axis; 1 where dense lacks one (dense against itself)."""
    value = getattr(row, x_field)
    return 1.0 if value is None else value


def _draw(ax, rows: list[SummaryRow], x_field: str, methods: list[str], handles: dict) -> None:
    """One line per method through its settings with the interval as error bars; dense as a
    star."""
    by_method: dict[str, list[SummaryRow]] = defaultdict(list)
    for r in rows:
        if getattr(r, x_field) is not None or r.setting == "dense":
            by_method[r.method].append(r)
    for method, group in sorted(by_method.items()):
        group.sort(key=lambda r: _x(r, x_field))
        xs, ys = [_x(r, x_field) for r in group], [r.score_mean for r in group]
        if method == "dense":
            handles["dense"] = ax.scatter(
                xs, ys, marker="*", s=180, color="black", label="dense", zorder=3
            )
            continue
        style = _style(methods.index(method))
        handles.setdefault(method, ax.plot(xs, ys, label=method, **style)[0])
        bars = [(x, y, r.score_interval) for x, y, r in zip(xs, ys, group) if r.score_interval]
        if bars:
            ax.errorbar(
                [x for x, _, _ in bars],
                [y for _, y, _ in bars],
                yerr=[[y - low for _, y, (low, _) in bars], [high - y for _, y, (_, high) in bars]],
                fmt="none",
                ecolor=style["color"],
                capsize=3,
                alpha=0.7,
            )
    ax.set_ylabel("mean score over tasks")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)


def _figure(rows: list[SummaryRow], panels: list[list[tuple]], path: Path) -> None:
    """Draw a grid of panels, each [(title, xlabel, x_field, rows)], with one legend beside."""
    methods = sorted({r.method for r in rows if r.method != "dense"})
    n_rows, n_columns = len(panels), max((len(p) for p in panels), default=1)
    legend_width = 0.5 + _label_inches(methods)
    width = 5 * max(n_columns, 1) + legend_width
    height = max(4.0 * max(n_rows, 1), 0.5 + 0.22 * (len(methods) + 1))
    fig, axes = plt.subplots(
        max(n_rows, 1), max(n_columns, 1), figsize=(width, height), squeeze=False
    )
    handles: dict[str, object] = {}
    for ax_row, panel_row in zip(axes, panels):
        for ax, (title, xlabel, x_field, drawn) in zip(ax_row, panel_row):
            _draw(ax, drawn, x_field, methods, handles)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
    order = [m for m in ["dense", *methods] if m in handles]
    fig.tight_layout(rect=(0, 0, 1 - legend_width / width, 1))
    fig.legend([handles[m] for m in order], order, loc="center right", fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_vs(rows: list[SummaryRow], x_field: str, xlabel: str, path: Path) -> None:
    """One subplot per length; one line per method through its settings; dense as a star; one
    legend for the figure, beside the subplots."""
    overall = _overall(rows)
    lengths = sorted({r.length for r in overall})
    row = [(f"{n} tokens", xlabel, x_field, [r for r in overall if r.length == n]) for n in lengths]
    _figure(overall, [row], path)


def score_vs_kind(
    rows: list[SummaryRow], kinds: dict[str, tuple[str, ...]] | None, path: Path
) -> None:
    """Score against each kind's own x axis (``KINDS``): one column per kind present, one
    row per length."""
    panels = kind_panels(rows, kinds) or {"prefill": _overall(rows)}  # dense alone
    lengths = sorted({r.length for r in _overall(rows)})
    grid = [
        [
            (
                f"{kind} · {n} tokens",
                KINDS[kind][1],
                KINDS[kind][0],
                [r for r in at if r.length == n],
            )
            for kind, at in panels.items()
        ]
        for n in lengths
    ]
    _figure(_overall(rows), grid, path)


def heatmap(rows: list[SummaryRow], path: Path) -> None:
    """Setting x length, colour = mean score over tasks, values written in the cells."""
    overall = _overall(rows)
    settings = sorted({r.setting for r in overall}, key=lambda s: (s != "dense", s))
    lengths = sorted({r.length for r in overall})
    grid = [[float("nan")] * len(lengths) for _ in settings]
    for r in overall:
        grid[settings.index(r.setting)][lengths.index(r.length)] = r.score_mean
    width = 2 + _label_inches(settings) + 1.5 * len(lengths)
    fig, ax = plt.subplots(figsize=(width, 1 + 0.3 * len(settings)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(settings)), settings, fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="white" if value < 0.6 else "black",
                    fontsize=8,
                )
    ax.set_xlabel("length (tokens)")
    fig.colorbar(image, ax=ax, label="mean score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(
    rows: list[SummaryRow], out_dir: Path, kinds: dict[str, tuple[str, ...]] | None = None
) -> list[Path]:
    """The PNGs of the report; ``kinds`` ({setting: kinds}, ``setting_kinds``) picks the
    panels of score_vs_density.png."""
    paths = [
        out_dir / "score_vs_density.png",
        out_dir / "score_vs_speedup.png",
        out_dir / "score_vs_decode_speedup.png",
        out_dir / "heatmap.png",
    ]
    score_vs_kind(rows, kinds, paths[0])
    score_vs(rows, "prefill_speedup", "prefill speedup vs dense (same run)", paths[1])
    score_vs(rows, "decode_speedup", "decode speedup per token vs dense (same run)", paths[2])
    heatmap(rows, paths[3])
    return paths


def _family(method: str, setting: str) -> str:
    """'xattention[profile=auto,threshold=0.9]' -> 'xattention profile=auto': the non-numeric
    knobs name the curve, the numeric ones are the points along it."""
    inside = setting[len(method) :].strip("[]")
    fixed = []
    for pair in filter(None, inside.split(",")):
        name, _, value = pair.partition("=")
        try:
            float(value)
        except ValueError:
            if value:
                fixed.append(f"{name}={value}")
    return " ".join([method, *fixed])


def recall_curves(records: list[dict], path: str | Path) -> None:
    """Recall vs measured density from ``bench recall`` records: one subplot per length, one
    line per method (and non-numeric knobs, e.g. a profile) through its settings, each point
    the mean over the captured layers."""
    points: dict[tuple[int, str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in records:
        key = (r["length"], _family(r["method"], r["setting"]), r["setting"])
        points[key].append((r["density"], r["recall"]))
    lengths = sorted({length for length, _, _ in points})
    fig, axes = plt.subplots(
        1, max(len(lengths), 1), figsize=(5.5 * max(len(lengths), 1), 4.5), squeeze=False
    )
    for ax, length in zip(axes[0], lengths):
        by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (at, method, _), values in points.items():
            if at == length:
                n = len(values)
                by_method[method].append(
                    (sum(d for d, _ in values) / n, sum(r for _, r in values) / n)
                )
        for index, (method, xy) in enumerate(sorted(by_method.items())):
            xy.sort()
            line = "--" if "oracle" in method else "-"
            ax.plot([x for x, _ in xy], [y for _, y in xy], line, label=method, **_style(index))
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("measured density")
        ax.set_ylabel("recall of the true attention mass")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_curves(records: list[dict], path: str | Path) -> None:
    """``bench memory`` records: cache MiB, resident MiB, ms per token and perplexity against
    the tokens seen, one line per setting (the dense reference has perplexity only)."""
    panels = [
        ("cache_bytes", "KV cache (MiB)", 2**-20),
        ("rss_mb", "process resident (MiB)", 1.0),
        ("s_per_token", "ms per token", 1e3),
        ("ppl", "perplexity per record window", 1.0),
    ]
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_setting[r["setting"]].append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (field, label, scale) in zip(axes[0], panels):
        for setting, group in sorted(by_setting.items()):
            xy = [(r["seen_tokens"], r[field] * scale) for r in group if r.get(field) is not None]
            if field == "s_per_token":
                xy = [(x, y) for (x, y), r in zip(xy, group) if r.get("streamed_tokens")]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", label=setting)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)  # flat reads as flat, not as noise magnified
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prompt_memory_curves(records: list[dict], path: str | Path) -> None:
    """``bench memory --prompt-tokens A,B,...`` records: peak memory added and KV bytes
    (allocated) against the prompt length, one line per setting."""
    panels = [
        ("peak_added_mb", "peak memory added (MiB)", 1.0),
        ("kv_bytes", "KV cache after the run (MiB)", 2**-20),
    ]
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_setting[r["setting"]].append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (field, label, scale) in zip(axes[0], panels):
        for setting, group in sorted(by_setting.items()):
            xy = sorted(
                (r["prompt_tokens"], r[field] * scale) for r in group if r.get(field) is not None
            )
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=setting)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

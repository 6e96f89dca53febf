"""Write DIR/summary.csv, DIR/report.md, DIR/report.html (self-contained) and PNG plots."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path

from ..errors import UsageError
from .frontier import RESULTS, read_records
from .plots import PLOTS_LEGEND, setting_kinds, write_plots
from .summary import RANKING, SummaryRow, recommendation_lines, summarize


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_csv(rows: list[SummaryRow], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SummaryRow.columns())
        for r in rows:
            writer.writerow(
                ["" if getattr(r, c) is None else getattr(r, c) for c in SummaryRow.columns()]
            )


MARKS = {"better": " ↑", "worse": " ↓", "indistinguishable": " =", "reference": ""}


def score_cell(r: SummaryRow) -> str:
    """'0.80 [0.40, 1.00] =': mean score, its paired interval on the score scale
    (``SummaryRow.score_interval``) and the verdict against dense; dense reads '1.00'."""
    text = f"{r.score_mean:.2f}"
    interval = r.score_interval
    if interval is not None:
        text += f" [{interval[0]:.2f}, {interval[1]:.2f}]" + MARKS[r.verdict]
    return text + (" *" if r.pareto else "") + ("" if r.informative else " (uninformative)")


def loglik_cell(r: SummaryRow | None) -> str:
    """'-4.19 [-7.83, -0.70] ↓': paired answer log-likelihood difference from dense (nats)."""
    if r is None or r.loglik_delta is None:
        return "-"
    return (
        f"{r.loglik_delta:+.2f} [{r.loglik_delta_low:+.2f}, {r.loglik_delta_high:+.2f}]"
        + MARKS[r.loglik_verdict]
    )


COLUMNS = [
    "ll Δ",
    "prefill density",
    "prefill speedup",
    "decode speedup",
    "KV share",
    "peak MiB",
]


def tables(rows: list[SummaryRow]) -> list[tuple[int, list[str], list[list[str]]]]:
    """Per length: header and body of the settings x tasks table; the columns after ALL are
    the pooled row's."""
    out = []
    for length in sorted({r.length for r in rows}):
        at = [r for r in rows if r.length == length]
        tasks = sorted({r.task for r in at if r.task != "ALL"})
        settings = sorted({r.setting for r in at}, key=lambda s: (s != "dense", s))
        cell = {(r.task, r.setting): r for r in at}
        header = ["setting", *tasks, "ALL", *COLUMNS]
        body = []
        for setting in settings:
            line = [setting]
            for task in [*tasks, "ALL"]:
                r = cell.get((task, setting))
                line.append("" if r is None else score_cell(r))
            overall = cell.get(("ALL", setting))  # None: every cell is dense by construction
            line += [
                loglik_cell(overall) if setting != "dense" else "",
                _fmt(overall and overall.prefill_density_mean, 3),
                _fmt(overall and overall.prefill_speedup),
                _fmt(overall and overall.decode_speedup),
                _fmt(overall and overall.kv_share),
                _fmt(overall and overall.peak_memory_mb_mean, 0),
            ]
            body.append(line)
        out.append((length, header, body))
    return out


LEGEND = (
    "Cells: mean score over samples, its 95% interval and the verdict against dense. The "
    "interval is the paired bootstrap interval of (setting - dense) on the same samples, "
    "moved onto the score scale (mean + [low - Δ, high - Δ]), so it holds dense's score "
    "exactly when the mark is `=`; `↑` / `↓` = better / worse than dense (the paired "
    "interval excludes 0). `ll Δ`: the same paired difference for the log-likelihood of the "
    "reference answer in nats, pooled over the tasks (per task in summary.csv). `*` = "
    "Pareto-optimal in (score, measured prefill density) for that task and length, where "
    "only real differences count (a setting indistinguishable from dense ranks with dense); "
    "`(uninformative)` = dense scores below 0.3 there, so the cell says little about "
    "sparsity. `ALL` pools the tasks, leaving out cells where a setting equals dense by "
    "construction (a decode-only setting on `fidelity`, which scores the prompt alone); the "
    "columns after it are the pooled row's. Density is measured (fraction of causal pairs "
    "computed); speedups are dense time / setting time from the same run; `KV share` = mean "
    "KV cache bytes / dense's on the same samples (below 1: an eviction policy freed memory; "
    "above 1: a method's side structures); `peak MiB` = mean peak memory of a sample."
)


def _recommended(rows: list[SummaryRow], per_length: int = 3) -> tuple[str, list[str]]:
    """The rule and the lines of the Recommended section."""
    return RANKING.format(per_length=per_length), recommendation_lines(rows, per_length)


def write_markdown(rows, records, images, path: Path) -> None:
    first = records[0]
    rule, recommended = _recommended(rows)
    lines = [
        "# sparseattn frontier report",
        "",
        f"Model: `{first.get('model')}`; seed {first.get('seed')}; {len(records)} records; "
        f"versions: {json.dumps(first.get('versions', {}))}",
        "",
        "## Recommended",
        "",
        *[f"- {line}" for line in recommended],
        "",
        rule,
        "",
        LEGEND,
        "",
    ]
    for length, header, body in tables(rows):
        lines += [
            f"## {length} tokens",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        lines.append("")
    if images:
        lines += [PLOTS_LEGEND, ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    path.write_text("\n".join(lines) + "\n")


def _html_text(text: str) -> str:
    """Markdown prose with `code` spans as HTML."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def write_html(rows, records, images, path: Path) -> None:
    first = records[0]
    rule, recommended = _recommended(rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sparseattn frontier</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}td:first-child{text-align:left}"
        ".un{color:#999}.star{font-weight:bold}img{max-width:100%}",
        "</style></head><body><h1>sparseattn frontier report</h1>",
        f"<p>Model <code>{html.escape(str(first.get('model')))}</code>, seed {first.get('seed')}, "
        f"{len(records)} records, versions {html.escape(json.dumps(first.get('versions', {})))}.</p>",
        "<h2>Recommended</h2><ul>",
        *[f"<li>{html.escape(line)}</li>" for line in recommended],
        f"</ul><p>{html.escape(rule)}</p>",
        f"<p>{_html_text(LEGEND)} Grey: uninformative; bold: Pareto-optimal.</p>",
    ]
    for length, header, body in tables(rows):
        parts.append(
            f"<h2>{length} tokens</h2><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
        )
        for line in body:
            cells = []
            for value in line:
                cls = "un" if "uninformative" in value else ("star" if value.endswith("*") else "")
                cells.append(f"<td class='{cls}'>{html.escape(value)}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    if images:
        parts.append(f"<p>{_html_text(PLOTS_LEGEND)}</p>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode()
        parts.append(
            f"<h3>{image.stem}</h3><img alt='{image.stem}' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    path.write_text("\n".join(parts))


def write_report(out_dir: str | Path) -> list[SummaryRow]:
    """Summarize DIR/results.jsonl into the CSV, Markdown, HTML and PNG outputs."""
    out_dir = Path(out_dir)
    records = read_records(out_dir / RESULTS)
    if not records:
        raise UsageError(f"{out_dir / RESULTS} holds no records")
    rows = summarize(records)
    write_csv(rows, out_dir / "summary.csv")
    images = write_plots(rows, out_dir, setting_kinds(records))
    write_markdown(rows, records, images, out_dir / "report.md")
    write_html(rows, records, images, out_dir / "report.html")
    return rows

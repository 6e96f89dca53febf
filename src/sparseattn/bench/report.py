"""Write DIR/summary.csv, DIR/report.md, DIR/report.html (self-contained) and PNG plots."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

from ..errors import UsageError
from .frontier import RESULTS, read_records
from .plots import write_plots
from .summary import SummaryRow, summarize


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


def _versus_dense(r: SummaryRow) -> str:
    """' (Δ -0.10 [-0.25, +0.05] =; ll -0.8 [-1.2, -0.4] ↓)': paired differences from dense."""
    parts = []
    if r.score_delta is not None:
        parts.append(
            f"Δ {r.score_delta:+.2f} [{r.score_delta_low:+.2f}, {r.score_delta_high:+.2f}]"
            + MARKS[r.verdict]
        )
    if r.loglik_delta is not None:
        parts.append(
            f"ll {r.loglik_delta:+.2f} [{r.loglik_delta_low:+.2f}, {r.loglik_delta_high:+.2f}]"
            + MARKS[r.loglik_verdict]
        )
    return f" ({'; '.join(parts)})" if parts else ""


def tables(rows: list[SummaryRow]) -> list[tuple[int, list[str], list[list[str]]]]:
    """Per length: header and body of the settings x tasks table."""
    out = []
    for length in sorted({r.length for r in rows}):
        at = [r for r in rows if r.length == length]
        tasks = sorted({r.task for r in at if r.task != "ALL"})
        settings = sorted({r.setting for r in at}, key=lambda s: (s != "dense", s))
        cell = {(r.task, r.setting): r for r in at}
        header = ["setting", *tasks, "ALL", "prefill density", "prefill speedup", "decode speedup"]
        body = []
        for setting in settings:
            line = [setting]
            for task in [*tasks, "ALL"]:
                r = cell.get((task, setting))
                if r is None:
                    line.append("")
                    continue
                text = f"{r.score_mean:.2f}" + _versus_dense(r) + (" *" if r.pareto else "")
                line.append(text + ("" if r.informative else " (uninformative)"))
            overall = cell.get(("ALL", setting))  # None: every cell is dense by construction
            line += [
                _fmt(overall and overall.prefill_density_mean, 3),
                _fmt(overall and overall.prefill_speedup),
                _fmt(overall and overall.decode_speedup),
            ]
            body.append(line)
        out.append((length, header, body))
    return out


def write_markdown(rows, records, images, path: Path) -> None:
    first = records[0]
    lines = [
        "# sparseattn frontier report",
        "",
        f"Model: `{first.get('model')}`; seed {first.get('seed')}; {len(records)} records; "
        f"versions: {json.dumps(first.get('versions', {}))}",
        "",
        "Cells: mean score over samples, then the paired difference from dense on the same "
        "samples with its 95% bootstrap interval (`Δ`), and the same for the log-likelihood of "
        "the reference answer in nats (`ll`); `↑` / `↓` = the interval excludes 0 (better / "
        "worse than dense), `=` = indistinguishable from dense. `*` = Pareto-optimal in "
        "(score, measured prefill density) for that task and length, where only real "
        "differences count (a setting indistinguishable from dense ranks with dense); "
        "`(uninformative)` = dense scores below 0.3 there, so the cell says little about "
        "sparsity. `ALL` pools the tasks, leaving out cells where a setting equals dense by "
        "construction (a decode-only setting on `fidelity`, which scores the prompt alone). "
        "Density is measured (fraction of causal pairs computed); speedups are dense "
        "time / setting time from the same run.",
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
    lines += [f"![{p.stem}]({p.name})" for p in images]
    path.write_text("\n".join(lines) + "\n")


def write_html(rows, records, images, path: Path) -> None:
    first = records[0]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sparseattn frontier</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}td:first-child{text-align:left}"
        ".un{color:#999}.star{font-weight:bold}img{max-width:100%}",
        "</style></head><body><h1>sparseattn frontier report</h1>",
        f"<p>Model <code>{html.escape(str(first.get('model')))}</code>, seed {first.get('seed')}, "
        f"{len(records)} records, versions {html.escape(json.dumps(first.get('versions', {})))}.</p>",
        "<p>Mean score; Δ / ll = paired difference from dense in score / answer "
        "log-likelihood (nats) with its 95% bootstrap interval (↑ better, ↓ worse, = "
        "indistinguishable); <b>*</b> Pareto-optimal (score vs measured prefill density, only "
        "real differences count); grey = uninformative (dense below 0.3); ALL pools the "
        "tasks, leaving out cells where a setting equals dense by construction (a decode-only "
        "setting on fidelity, which scores the prompt alone). Speedups: dense "
        "time / setting time, same run.</p>",
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
    images = write_plots(rows, out_dir)
    write_markdown(rows, records, images, out_dir / "report.md")
    write_html(rows, records, images, out_dir / "report.html")
    return rows

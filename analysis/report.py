"""The comparison report: one self-contained HTML file (charts embedded as data URIs, a small
inline script to sort the trial table, nothing fetched from the network) and a Markdown
summary, rebuilt from the stores at any time.

Everything that comes from the stores (study names, params, tags, reasons) is user text and
is HTML-escaped where it is written; study names become folder names only through
`batchscope.analysis.paths.safe_name`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pandas as pd

from batchscope.analysis import report_cache, tables
from batchscope.analysis._gc import paused_gc
from batchscope.analysis.load import ReadMethod, SweepData, load_sweep
from batchscope.analysis.paths import child_dir, safe_name
from batchscope.analysis.readonly_stores import DEFAULT_TRACKING_UI, StorageLike, redact_url
from batchscope.analysis.report_artifacts import REPORT_FILE, SUMMARY_FILE
from batchscope.analysis.report_artifacts import log_report_artifacts as log_report_artifacts  # its home until now
from batchscope.analysis.text import interval, number

if TYPE_CHECKING:
    # Rendering (analysis, matplotlib, scipy through optuna.importance) is imported where it
    # is used: a report whose inputs are unchanged (report_cache) never needs it.
    from batchscope.analysis.analyze import SweepAnalysis
    from batchscope.analysis.charts import Chart
    from batchscope.analysis.findings import Findings
    from batchscope.analysis.style import ImageFormat


# Trial table: (header, trials column, is numeric).
_TRIAL_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("trial", "trial", True),
    ("seed", "seed", True),
    ("batch size", "batch_size", True),
    ("lr", "lr", True),
    ("state", "state", False),
    ("status", "status", False),
    ("reason", "reason", False),
    ("objective", "objective", True),
    ("val loss", "final/val_loss", True),
    ("val acc", "final/val_acc", True),
    ("steps to target", tables.STEPS, True),
    ("time to target [s]", tables.TIME, True),
    ("gen gap", "final/gen_gap", True),
    ("sharpness", "final/sharpness", True),
    ("wall [s]", "final/wall_s", True),
)

_SORT_SCRIPT = """
// Report health, readable by automated checks: how many charts decoded.
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-loaded", String(ok));
});
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    function key(row) {
      var cell = row.cells[index], v = cell.getAttribute("data-v");
      if (v === null) { return cell.textContent.toLowerCase(); }
      return v === "" ? null : parseFloat(v);
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null) { return y === null ? 0 : 1; }
      if (y === null) { return -1; }
      return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""

_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1440px; margin: 0 auto; padding: 1.5rem 2rem 4rem; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem;
     border-bottom: 2px solid #ddd; padding-bottom: 0.2rem; } h3 { margin-top: 1.8rem; }
.meta { color: #666; font-size: 0.85rem; }
ul.findings li { margin: 0.35rem 0; }
figure { margin: 1.2rem 0 2rem; } figure img { max-width: 100%; height: auto;
  border: 1px solid #eee; } figcaption { color: #555; font-size: 0.85rem; max-width: 70rem; }
table { border-collapse: collapse; font-size: 0.82rem; margin: 0.8rem 0; }
th, td { padding: 0.25rem 0.55rem; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f5f5f5; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
.table-wrap { max-height: 36rem; overflow: auto; border: 1px solid #eee; }
nav a { margin-right: 1rem; }
"""


@dataclass(frozen=True)
class StudyReport:
    sweep: SweepData
    analysis: SweepAnalysis
    findings: Findings
    charts: list[Chart]


# --- public API -----------------------------------------------------------------------------


def build_report(
    studies: Sequence[str],
    *,
    storage: StorageLike | None = None,
    tracking_uri: str | None = None,
    out_dir: Path = Path("reports"),
    tracking_ui: str = DEFAULT_TRACKING_UI,
    image_format: ImageFormat = "png",
    write_images: bool = True,
    method: ReadMethod = "auto",
) -> Path:
    """Load each study from the stores and write its report; returns the index.html path.

    One study: `out_dir/<safe-study-name>/index.html`. Several: one comparison report in
    `out_dir/<safe-name-of-"compare-a-vs-b">/index.html` with a combined findings table and a
    section per study. `summary.md` (and, with write_images, the charts as files) sit beside it.
    `storage` and `tracking_uri` left out are the local store's (see `load_sweep`).
    """
    if isinstance(studies, str):
        raise TypeError(f"studies must be a list of study names, but got a string: {studies=}")
    if not studies:
        raise ValueError("studies must name at least one study.")
    sweeps = [load_sweep(name, storage=storage, tracking_uri=tracking_uri, method=method) for name in studies]
    return render_report(
        sweeps,
        out_dir=out_dir,
        tracking_ui=tracking_ui,
        image_format=image_format,
        write_images=write_images,
    )


def render_report(
    sweeps: Sequence[SweepData],
    *,
    out_dir: Path,
    tracking_ui: str = DEFAULT_TRACKING_UI,
    image_format: ImageFormat = "png",
    write_images: bool = True,
    strict: bool = False,
) -> Path:
    """Write the report of already-loaded sweeps (see `build_report`)."""
    if not sweeps:
        raise ValueError("sweeps must hold at least one loaded study.")
    if not re.match(r"^https?://", tracking_ui):
        raise ValueError(f"tracking_ui must be an http(s) URL, but got {tracking_ui=}.")
    names = [s.study_name for s in sweeps]
    folder_name = names[0] if len(names) == 1 else "compare-" + "-vs-".join(names)
    folder = child_dir(out_dir, folder_name)
    options = {"studies": names, "tracking_ui": tracking_ui, "format": image_format, "images": write_images}
    key = report_cache.report_key(sweeps, options)
    if report_cache.is_current(folder, key):
        return folder / REPORT_FILE  # rendered from these very inputs already (see report_cache)
    from batchscope.analysis.analyze import analyze
    from batchscope.analysis.charts import render_charts, render_comparison
    from batchscope.analysis.findings import findings
    from batchscope.analysis.style import BatchColors

    colors = BatchColors(b for s in sweeps for b in s.trials["batch_size"].dropna())
    reports = []
    with paused_gc():  # a tenth of the rendering time otherwise (see paused_gc)
        for sweep in sweeps:
            result = analyze(sweep)
            charts = render_charts(sweep, result, colors, image_format=image_format, strict=strict)
            reports.append(StudyReport(sweep, result, findings(sweep, result), charts))
        comparison = None
        if len(reports) > 1:
            pairs = [(r.sweep.study_name, r.analysis) for r in reports]
            comparison = render_comparison(pairs, image_format=image_format)

    folder.mkdir(parents=True, exist_ok=True)
    report_cache.forget(folder)
    page = _html(reports, comparison, tracking_ui.rstrip("/"))
    (folder / REPORT_FILE).write_text(page, encoding="utf-8")
    (folder / SUMMARY_FILE).write_text(_markdown(reports), encoding="utf-8")
    if write_images:
        _write_images(folder, reports, comparison)
    report_cache.record(folder, key)
    return folder / REPORT_FILE


# --- HTML -----------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Escape any store text for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _data_uri(chart: Chart) -> str:
    return f"data:{chart.mime};base64,{base64.b64encode(chart.image).decode('ascii')}"


def _cell(value: object, numeric: bool) -> str:
    if not numeric:
        text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
        if text is pd.NA:
            text = ""
        return f'<td class="text">{_e(text)}</td>'
    try:
        number_value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number_value = math.nan
    if not math.isfinite(number_value):
        return '<td data-v=""></td>'
    return f'<td data-v="{number_value!r}">{_e(number(number_value))}</td>'


def _run_link(tracking_ui: str, experiment_id: str | None, run_id: object) -> str:
    if experiment_id is None or not isinstance(run_id, str) or not run_id:
        return '<td class="text"></td>'
    url = f"{tracking_ui}/#/experiments/{quote(experiment_id, safe='')}/runs/{quote(run_id, safe='')}"
    return f'<td class="text"><a href="{_e(url)}">{_e(run_id[:8])}</a></td>'


def _trial_table(report: StudyReport, tracking_ui: str) -> str:
    trials = report.sweep.trials
    columns = [c for c in _TRIAL_COLUMNS if c[1] in trials]
    head = "".join(f'<th class="{"" if numeric else "text"}">{_e(header)}</th>' for header, _, numeric in columns)
    rows = []
    for record in trials.to_dict("records"):
        cells = "".join(_cell(record.get(column), numeric) for _, column, numeric in columns)
        cells += _run_link(tracking_ui, report.sweep.experiment_id, record.get("run_id"))
        rows.append(f"<tr>{cells}</tr>")
    return (
        '<div class="table-wrap"><table class="sortable">'
        f'<thead><tr>{head}<th class="text">MLflow run</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _frame_table(frame: pd.DataFrame, *, text_columns: Sequence[str] = ()) -> str:
    head = "".join(f'<th class="{"text" if c in text_columns else ""}">{_e(c)}</th>' for c in frame.columns)
    rows = [
        "<tr>" + "".join(_cell(record[c], c not in text_columns) for c in frame.columns) + "</tr>"
        for record in frame.to_dict("records")
    ]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure(chart: Chart, anchor: str) -> str:
    return (
        f'<figure id="{_e(anchor)}"><img src="{_data_uri(chart)}" alt="{_e(chart.title)}">'
        f"<figcaption><strong>{_e(chart.title)}.</strong> {_e(chart.caption)}</figcaption></figure>"
    )


def _study_section(report: StudyReport, index: int, tracking_ui: str, *, heading: bool) -> str:
    sweep = report.sweep
    anchor = f"study-{index}"
    parts = []
    if heading:
        parts.append(f'<h2 id="{anchor}">{_e(sweep.study_name)}</h2>')
    parent = ""
    if sweep.parent_run_id and sweep.experiment_id:
        url = (
            f"{tracking_ui}/#/experiments/{quote(sweep.experiment_id, safe='')}"
            f"/runs/{quote(sweep.parent_run_id, safe='')}"
        )
        parent = f' · <a href="{_e(url)}">sweep run in MLflow</a>'
    parts.append(
        f'<p class="meta">objective: {_e(report.analysis.score_label)} · tracking: '
        f"{_e(redact_url(sweep.tracking_uri))}{parent}</p>"
    )
    parts.append("<h3>Findings</h3><ul class='findings'>")
    parts += [f"<li>{_e(sentence)}</li>" for sentence in report.findings.sentences]
    parts.append("</ul>")
    from batchscope.analysis.findings import per_batch_note, per_batch_table

    per_batch = per_batch_table(report.analysis)
    if not per_batch.empty:
        note = f"<p class='meta'>{html.escape(per_batch_note(report.analysis))}</p>"
        text = [c for c in per_batch.columns if not pd.api.types.is_numeric_dtype(per_batch[c])]
        parts.append("<h3>Per batch size</h3>" + _frame_table(per_batch, text_columns=text) + note)
    parts.append("<h3>Charts</h3>")
    parts += [_figure(chart, f"{anchor}-{chart.name}") for chart in report.charts]
    parts.append(f"<h3>Trials ({len(sweep.trials)} rows; click a header to sort)</h3>")
    parts.append(_trial_table(report, tracking_ui))
    return f'<section id="{anchor}-section">' + "\n".join(parts) + "</section>"


def _html(reports: list[StudyReport], comparison: Chart | None, tracking_ui: str) -> str:
    names = [r.sweep.study_name for r in reports]
    title = "Batch-size report: " + " vs ".join(names)
    script_hash = base64.b64encode(hashlib.sha256(_SORT_SCRIPT.encode()).digest()).decode()
    # The page needs nothing from the network: a policy that allows only itself makes sure.
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="meta">generated {generated} by batchscope</p>']
    if comparison is not None:
        rows = pd.DataFrame([r.findings.row for r in reports])
        nav = " ".join(f'<a href="#study-{i}">{_e(name)}</a>' for i, name in enumerate(names))
        body += [
            f"<nav>{nav}</nav>",
            '<h2 id="comparison">Comparison</h2>',
            _frame_table(rows, text_columns=list(rows.columns)),
            _figure(comparison, "comparison-chart"),
        ]
    for i, report in enumerate(reports):
        body.append(_study_section(report, i, tracking_ui, heading=comparison is not None))
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{_SORT_SCRIPT}</script>\n</body></html>\n"
    )


# --- Markdown and image files ---------------------------------------------------------------


def _md(value: object) -> str:
    """Store text for Markdown: <, > and & HTML-escaped (renderers show entities as text; quotes
    need none outside HTML attributes, and stay readable) and pipes escaped so a name cannot
    break a table."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return number(value) if math.isfinite(value) else ""
        return "" if value is None or value is pd.NA else _md(value)

    lines = [
        "| " + " | ".join(_md(c) for c in frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _markdown(reports: list[StudyReport]) -> str:
    from batchscope.analysis.findings import per_batch_note, per_batch_table

    names = [r.sweep.study_name for r in reports]
    lines = [f"# Batch-size report: {' vs '.join(_md(n) for n in names)}", ""]
    if len(reports) > 1:
        lines += ["## Comparison", "", _md_table(pd.DataFrame([r.findings.row for r in reports])), ""]
    for report in reports:
        if len(reports) > 1:
            lines += [f"## {_md(report.sweep.study_name)}", ""]
        lines += [f"- {_md(sentence)}" for sentence in report.findings.sentences]
        per_batch = per_batch_table(report.analysis)
        if not per_batch.empty:
            lines += ["", "### Per batch size", "", _md_table(per_batch), "", per_batch_note(report.analysis)]
        lines += ["", "### B_crit against compute", "", *_md_progress(report.analysis)]
        lines += ["", f"Charts and the full trial table: `{REPORT_FILE}`.", ""]
    return "\n".join(lines)


def _md_progress(result: SweepAnalysis) -> list[str]:
    """The B_crit-against-compute chart's numbers, or why there are none."""
    from batchscope.analysis.charts import CHARTS

    progress = result.b_crit_progress
    if progress.empty:
        return ["Not fitted. " + _md(result.b_crit_progress_note)]
    table = pd.DataFrame(
        {
            "trials completed": progress["trials"].astype(str),
            "compute [examples]": progress["compute"].astype(float),
            "batch sizes at target": progress["n_batch_sizes"].astype(str),
            "B_crit": progress["b_crit"].astype(float),
            "95% interval": [
                interval(lo, hi) for lo, hi in zip(progress["b_crit_low"], progress["b_crit_high"], strict=True)
            ],
        }
    )
    caption = next((c.caption for c in CHARTS if c.name == "b-crit-progress"), "")
    return [_md_table(table), "", caption]


def _write_images(folder: Path, reports: list[StudyReport], comparison: Chart | None) -> None:
    charts_dir = folder / "charts"
    charts_dir.mkdir(exist_ok=True)
    several = len(reports) > 1
    for report in reports:
        prefix = f"{safe_name(report.sweep.study_name)}-" if several else ""
        for chart in report.charts:
            (charts_dir / f"{prefix}{chart.name}.{chart.image_format}").write_bytes(chart.image)
    if comparison is not None:
        (charts_dir / f"comparison.{comparison.image_format}").write_bytes(comparison.image)

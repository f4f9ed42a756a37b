"""The phases of `batchscope report`'s first report, timed in one process (run by report_speed.py).

    python benchmarks/report_probe.py STUDY STORE_DIR OUT_DIR

Runs the steps `batchscope report STUDY` takes, in its order, on the stores under STORE_DIR
(optuna.journal, mlflow.db) and prints one JSON line: CPU seconds of each phase. It uses only
functions that the code before issue 19's report work has too, so that report_speed.py can run
it on both and show where the time went.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time


def main(study: str, store: str, out: str) -> dict[str, float]:
    phases: dict[str, float] = {}
    last = [0.0]  # process_time counts from the interpreter's start

    def mark(name: str) -> None:
        now = time.process_time()
        phases[name] = phases.get(name, 0.0) + now - last[0]
        last[0] = now

    from pathlib import Path

    from batchscope.sweeps import commands  # the CLI's own module (rich)

    mark("interpreter, the CLI (rich)")
    stores = commands._analysis_stores(f"{store}/optuna.journal", f"sqlite:///{store}/mlflow.db")
    mark("store checks (optuna, the journal)")
    from batchscope.analysis import report, report_cache

    mark("imports: analysis.report (pandas)")
    sweep = report.load_sweep(study, storage=stores.storage_url, tracking_uri=stores.tracking_uri)
    mark("load_sweep: the journal and MLflow's tables")
    report_cache.report_key([sweep], {"studies": [study]})
    mark("report key (digest of the inputs)")
    from batchscope.analysis import analyze, charts, findings, style

    mark("imports: analysis, fits, charts (scipy, matplotlib)")
    # As render_report renders: with the garbage collector paused where that version pauses it.
    with getattr(report, "paused_gc", contextlib.nullcontext)():
        importances = analyze._importances(sweep.study)
        mark("fANOVA importances (sklearn imported on first use)")
        analyze._importances = lambda _study: importances  # computed once, as in analyze()
        result = analyze.analyze(sweep)
        mark("the rest of the analysis (fits, B_crit progress, noise scale)")
        findings.findings(sweep, result)
        mark("findings")
        colors = style.BatchColors(sweep.trials["batch_size"].dropna())
        charts.render_charts(sweep, result, colors, strict=True)
        mark("charts: 8 figures drawn, laid out, saved as PNG")
    path = report.build_report([study], storage=stores.storage_url, tracking_uri=stores.tracking_uri, out_dir=Path(out))
    mark("(build_report again: the whole report, for the files to log)")
    report.log_report_artifacts(path, [study], tracking_uri=stores.tracking_uri)
    mark("log to the sweep's MLflow run")
    return phases


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))

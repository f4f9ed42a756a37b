"""The phases of `batchscope report`'s first report, timed in one process (run by report_speed.py).

    python benchmarks/report_probe.py STUDY STORE_DIR OUT_DIR

Runs the steps `batchscope report STUDY` takes, in its order, on the stores under STORE_DIR
(optuna.journal, mlflow.db) and prints one JSON line: CPU seconds of each phase (this process's and
its forked children's: the report draws its charts in forked processes, analysis/_fork.py), and wall
seconds (the first phase's from the launch, given as BATCHSCOPE_PROBE_LAUNCHED). It uses only
functions that the code before issue 19's report work has too, so that report_speed.py can run
it on both and show where the time went.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (the report's forks)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(study: str, store: str, out: str) -> dict[str, dict[str, float]]:
    phases: dict[str, dict[str, float]] = {"cpu": {}, "wall": {}}
    # Both from the interpreter's start: report_speed.py says when it launched this process.
    last = {"cpu": 0.0, "wall": float(os.environ.get("BATCHSCOPE_PROBE_LAUNCHED", time.time()))}

    def mark(name: str) -> None:
        now = {"cpu": _cpu(), "wall": time.time()}
        for kind in ("cpu", "wall"):
            phases[kind][name] = phases[kind].get(name, 0.0) + now[kind] - last[kind]
            last[kind] = now[kind]

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
        mark("fANOVA importances alone (sklearn imported; overlaps the rest in a fork where the version does)")
        analyze._importances = lambda study: importances  # computed once, as in analyze()
        result = analyze.analyze(sweep)
        mark("the rest of the analysis (fits, B_crit progress, noise scale)")
        findings.findings(sweep, result)
        mark("findings")
        colors = style.BatchColors(sweep.trials["batch_size"].dropna())
        charts.render_charts(sweep, result, colors, strict=True)
        mark("charts: 8 figures drawn, laid out, saved as PNG (forked where the version does)")
    path = report.build_report([study], storage=stores.storage_url, tracking_uri=stores.tracking_uri, out_dir=Path(out))
    mark("(build_report again: the whole report, for the files to log)")
    report.log_report_artifacts(path, [study], tracking_uri=stores.tracking_uri)
    mark("log to the sweep's MLflow run")
    return phases


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))

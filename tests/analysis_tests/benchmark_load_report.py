"""Benchmark: load + report for 500 runs × 2,000 logged steps (not collected by pytest).

    python -m tests.analysis_tests.benchmark_load_report [STORE_DIR]

The store is generated once through MLflow's public API (minutes) and reused from STORE_DIR
(default /tmp/batchscope-bench) on later runs. Prints the time of each phase.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from tests.analysis_tests.conftest import SweepSpec, make_synthetic_sweep

BENCH_SPEC = SweepSpec(
    study_name="bench",
    batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    lrs=tuple(float(x) for x in np.geomspace(0.002, 0.2, 25)),
    seeds=(0, 1),
    max_steps=2000,
    eval_every=50,
    train_loss_every=1,
    s_min=100.0,
    b_crit=256.0,
    # Every run logs all 2,000 steps: nothing diverges or is pruned early.
    divergence_factor=1e9,
    prune_slowdown=1e9,
)


def main(store_dir: Path) -> None:
    db = store_dir / "mlflow.db"
    journal = store_dir / "optuna.journal"
    tracking_uri = f"sqlite:///{db}"
    if not db.exists():
        started = time.perf_counter()
        make_synthetic_sweep(store_dir, BENCH_SPEC, tracking_uri=tracking_uri, journal_path=journal)
        print(f"generated store in {time.perf_counter() - started:.1f} s")

    from analysis.load import load_sweep
    from analysis.report import build_report, render_report

    started = time.perf_counter()
    sweep = load_sweep(BENCH_SPEC.study_name, storage=journal, tracking_uri=tracking_uri)
    loaded = time.perf_counter()
    print(f"load: {loaded - started:.1f} s  ({len(sweep.trials)} runs, {len(sweep.history):,} history rows)")
    render_report([sweep], out_dir=store_dir / "reports")
    print(f"report from loaded data: {time.perf_counter() - loaded:.1f} s")

    started = time.perf_counter()
    path = build_report(
        [BENCH_SPEC.study_name],
        storage=journal,
        tracking_uri=tracking_uri,
        out_dir=store_dir / "reports",
    )
    print(f"build_report (load + report): {time.perf_counter() - started:.1f} s -> {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/batchscope-bench"))

"""Analysis at scale: load + report of a study of 500 trials × 2,000 logged steps.

    python -m benchmarks --only analysis          (or: python -m benchmarks.analysis_scale [STORE_DIR])

The study is written through MLflow's and Optuna's public APIs by the analysis tests'
synthetic-sweep generator (tests/analysis_tests/conftest.py: a model of training that
follows the tracking contract), once: it takes minutes, so the store is cached under
$BATCHSCOPE_BENCH_CACHE (default: the system's temporary folder) and reused while the
generator and the spec are unchanged. Then the report is built from the stores and timed.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import Section, Timing, cache_root, markdown_table, timed
from tests.analysis_tests import conftest
from tests.analysis_tests.conftest import SweepSpec, make_synthetic_sweep

TARGET_S = 10.0  # issue 19 (it was 60 s before)

# 10 batch sizes × 50 learning rates = 500 trials, one seed each, every step's train/loss logged.
BENCH_SPEC = SweepSpec(
    study_name="bench",
    batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    lrs=tuple(float(x) for x in np.geomspace(0.002, 0.2, 50)),
    seeds=(0,),
    max_steps=2000,
    eval_every=50,
    train_loss_every=1,
    s_min=100.0,
    b_crit=256.0,
    # Every run logs all 2,000 steps: nothing diverges or is pruned early.
    divergence_factor=1e9,
    prune_slowdown=1e9,
)
# --quick: 100 trials of the same length.
QUICK_SPEC = replace(BENCH_SPEC, study_name="bench-quick", lrs=tuple(float(x) for x in np.geomspace(0.002, 0.2, 10)))
_DONE = "generated.ok"


def store_dir(spec: SweepSpec) -> Path:
    """A folder per (spec, generator source): a changed generator is never served from an old cache."""
    key = repr(spec) + inspect.getsource(conftest)
    return cache_root() / f"analysis-{spec.study_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_store(spec: SweepSpec, folder: Path | None = None) -> tuple[Path, float | None]:
    """The cached store's folder, generated first if needed; and the generation's seconds (None if cached)."""
    folder = folder or store_dir(spec)
    if (folder / _DONE).exists():
        return folder, None
    shutil.rmtree(folder, ignore_errors=True)  # a half-written store from an interrupted run
    folder.mkdir(parents=True)
    started = time.perf_counter()
    make_synthetic_sweep(
        folder, spec, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", journal_path=folder / "optuna.journal"
    )
    (folder / _DONE).write_text("ok\n")
    return folder, time.perf_counter() - started


def measure(spec: SweepSpec, folder: Path | None = None) -> dict[str, object]:
    from batchscope.analysis.load import load_sweep
    from batchscope.analysis.report import build_report, render_report
    from batchscope.analysis.report_cache import report_key

    folder, generated_s = ensure_store(spec, folder)
    journal, uri = folder / "optuna.journal", f"sqlite:///{folder / 'mlflow.db'}"
    loaded: list[object] = []
    with tempfile.TemporaryDirectory() as out:
        load = timed(lambda: loaded.append(load_sweep(spec.study_name, storage=journal, tracking_uri=uri)))
        sweep = loaded[0]
        render = timed(lambda: render_report([sweep], out_dir=Path(out) / "a"))  # type: ignore[list-item]

        def build() -> None:
            build_report([spec.study_name], storage=journal, tracking_uri=uri, out_dir=Path(out) / "b")

        whole = timed(build)
        # The same stores again: the report folder's key matches, nothing is rendered (report_cache).
        again = timed(build)
        key = timed(lambda: report_key([sweep], {"studies": [spec.study_name]}))  # type: ignore[list-item]
    return {
        "folder": folder,
        "generated_s": generated_s,
        "runs": len(sweep.trials),  # type: ignore[attr-defined]
        "history_rows": len(sweep.history),  # type: ignore[attr-defined]
        "db_mb": (folder / "mlflow.db").stat().st_size / 2**20,
        "load": load,
        "render": render,
        "build_report": whole,
        "again": again,
        "key": key,
    }


def analysis_section(quick: bool) -> Section:
    spec = QUICK_SPEC if quick else BENCH_SPEC
    m = measure(spec)
    trials = len(spec.batch_sizes) * len(spec.lrs)

    def t(timing: object) -> tuple[str, str]:
        assert isinstance(timing, Timing)
        return f"{timing.wall_s:.1f} s", f"{timing.cpu_s:.1f} s"

    rows = [
        ("load_sweep (Optuna journal + MLflow tables → DataFrames)", *t(m["load"]), ""),
        ("render_report from the loaded study (analysis, charts, HTML)", *t(m["render"]), ""),
        ("**build_report: load + report**", *t(m["build_report"]), f"≤ {TARGET_S:.0f} s"),
        ("report key alone (digest of the loaded tables and Optuna trials)", *t(m["key"]), ""),
        ("build_report again, stores unchanged (load + key; nothing rendered)", *t(m["again"]), ""),
    ]
    whole = m["build_report"]
    assert isinstance(whole, Timing)
    met = whole.wall_s <= TARGET_S
    generated = m["generated_s"]
    notes = [
        f"{trials} trials × {len(spec.seeds)} seed → {m['runs']} MLflow runs, {spec.max_steps:,} steps each with "
        f"`train/loss` at every step and 9 metrics every {spec.eval_every}: {m['history_rows']:,} history rows, "
        f"a {m['db_mb']:.0f} MB SQLite store.",
        "Generated through MLflow's and Optuna's public APIs by tests/analysis_tests/conftest.py "
        + (f"in {generated:.0f} s this run" if generated is not None else "earlier (cached)")
        + f"; cached in {m['folder']}.",
    ]
    if quick:
        notes.append("Quick mode: 100 trials; the target is for the full 500.")
    return Section(
        name="analysis",
        title="5. Analysis at scale: load + report of a large study",
        target=f"report of 500 trials × 2,000 logged steps in at most {TARGET_S:.0f} s (first report of the stores)",
        verdict=("met" if met else "missed") + f" ({whole.wall_s:.0f} s)" + (", quick size" if quick else ""),
        tables=[markdown_table(["phase", "wall", "CPU", "target"], rows)],
        notes=notes,
    )


if __name__ == "__main__":
    result = measure(BENCH_SPEC, Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    for key, value in result.items():
        print(f"{key}: {value}")

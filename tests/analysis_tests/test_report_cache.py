"""A report of unchanged stores is not rendered twice; one of a sweep that continued is."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from mlflow import MlflowClient

from batchscope.analysis.load import SweepData, load_sweep
from batchscope.analysis.report import DEFAULT_TRACKING_UI, log_report_artifacts, render_report
from batchscope.analysis.report_cache import KEY_FILE, report_key
from tests.analysis_tests.conftest import SweepSpec, make_synthetic_sweep, open_journal

# render_report's options as it records them (its defaults).
OPTIONS = {"studies": ["resumed"], "tracking_ui": DEFAULT_TRACKING_UI, "format": "png", "images": True}
SPEC = SweepSpec(study_name="resumed", batch_sizes=(32, 128), lrs=(0.01, 0.04), seeds=(0,), max_steps=300)


def _load(root: Path) -> SweepData:
    return load_sweep(SPEC.study_name, storage=root / "optuna.journal", tracking_uri=f"sqlite:///{root}/mlflow.db")


def _report(root: Path, out: Path) -> Path:
    return render_report([_load(root)], out_dir=out, strict=True)


def _written(report: Path) -> dict[str, int]:
    """Each file of the report folder and when it was last written."""
    return {str(p.relative_to(report.parent)): p.stat().st_mtime_ns for p in report.parent.rglob("*") if p.is_file()}


def test_unchanged_stores_reuse_the_report_and_a_resumed_sweep_renders_anew(tmp_path: Path):
    root, out = tmp_path / "stores", tmp_path / "reports"
    synthetic = make_synthetic_sweep(root, SPEC)
    first = _report(root, out)
    before = _written(first)
    assert KEY_FILE in before and "summary.md" in before
    assert "This sweep has 4 trials" in (first.parent / "summary.md").read_text()

    run_ids = log_report_artifacts(first, [SPEC.study_name], tracking_uri=synthetic.tracking_uri)
    # The local store's copy of the logged file: its ctime changes whenever it is written
    # (MLflow copies with copy2, which keeps the mtime).
    logged = next(root.rglob("report/summary.md"))
    logged_at = logged.stat().st_ctime_ns
    before = _written(first)

    # Same stores: nothing is rendered, written or logged again.
    assert _report(root, out) == first
    assert _written(first) == before
    assert log_report_artifacts(first, [SPEC.study_name], tracking_uri=synthetic.tracking_uri) == run_ids
    assert logged.stat().st_ctime_ns == logged_at

    # Unless a file of it is missing.
    chart = next((first.parent / "charts").iterdir())
    chart.unlink()
    _report(root, out)
    assert chart.is_file()
    before = _written(first)

    # The sweep continues: a new Optuna trial. The report must count it.
    study = optuna.load_study(study_name=SPEC.study_name, storage=open_journal(synthetic.journal_path))
    done = study.trials[0]
    study.add_trial(optuna.trial.create_trial(params=done.params, distributions=done.distributions, value=done.value))
    resumed = _report(root, out)
    assert "This sweep has 5 trials" in (resumed.parent / "summary.md").read_text()
    after_trial = _written(resumed)
    assert after_trial["index.html"] != before["index.html"]
    assert log_report_artifacts(resumed, [SPEC.study_name], tracking_uri=synthetic.tracking_uri) == run_ids
    assert "This sweep has 5 trials" in logged.read_text()

    # A running trial logs one more value: the key changes too (it reads every history row).
    recorded = json.loads((resumed.parent / KEY_FILE).read_text())["key"]
    assert report_key([_load(root)], OPTIONS) == recorded
    MlflowClient(synthetic.tracking_uri).log_metric(synthetic.run_ids[0], "train/loss", 0.5, step=SPEC.max_steps + 1)
    assert report_key([_load(root)], OPTIONS) != recorded

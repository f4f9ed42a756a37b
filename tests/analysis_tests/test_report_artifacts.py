"""A report of the local store is read and logged without MLflow's client (its import alone is 1 s
of a report of a few seconds), and MLflow sees the logged files as its own artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from batchscope.analysis._mlflow_raw import sqlite_file
from batchscope.analysis.report_artifacts import _local_folder
from tests.analysis_tests.conftest import SweepSpec, make_synthetic_sweep

SPEC = SweepSpec(study_name="logged", batch_sizes=(32, 128), lrs=(0.01, 0.04), seeds=(0,), max_steps=300)

# Run in a fresh interpreter: which libraries the report loads is what is tested.
_REPORT_AND_LOG = """
import json, sys
from pathlib import Path
from batchscope.analysis.report import build_report, log_report_artifacts
root, out = Path(sys.argv[1]), Path(sys.argv[2])
uri = f"sqlite:///{root}/mlflow.db"
path = build_report(["logged"], storage=root / "optuna.journal", tracking_uri=uri, out_dir=out)
run_ids = log_report_artifacts(path, ["logged"], tracking_uri=uri)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "sqlalchemy"})
print(json.dumps({"path": str(path), "run_ids": run_ids, "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("stores")
    synthetic = make_synthetic_sweep(root, SPEC)
    out = tmp_path_factory.mktemp("reports")
    proc = subprocess.run(
        [sys.executable, "-c", _REPORT_AND_LOG, str(root), str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["run_ids"] == [synthetic.parent_run_id]
    return root, result


def test_the_local_store_is_reported_and_logged_without_mlflow_or_sqlalchemy(logged: tuple[Path, dict[str, object]]):
    _, result = logged
    assert result["loaded"] == []


def test_mlflow_lists_the_copied_report_as_the_parent_runs_artifacts(logged: tuple[Path, dict[str, object]]):
    root, result = logged
    run_ids = result["run_ids"]
    assert isinstance(run_ids, list)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    listed = client.list_artifacts(run_ids[0], "report")
    assert sorted(Path(f.path).name for f in listed) == ["index.html", "summary.md"]
    # The same bytes come back through MLflow's own download.
    local = Path(client.download_artifacts(run_ids[0], "report/summary.md", str(root / "download")))
    assert local.read_bytes() == (Path(str(result["path"])).parent / "summary.md").read_bytes()
    # No staging file is left beside them.
    assert sorted(p.name for p in local.parent.iterdir()) == ["summary.md"]
    folder = next(root.rglob("report/index.html")).parent
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "summary.md"]


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("sqlite:///mlruns/mlflow.db", "mlruns/mlflow.db"),  # relative, as SQLAlchemy reads it
        ("sqlite:////tmp/x/mlflow.db", "/tmp/x/mlflow.db"),
        ("sqlite:///mlflow.db?timeout=30", None),  # options: SQLAlchemy's to read
        ("sqlite://", None),  # in memory
        ("postgresql://u@h/db", None),
        ("http://127.0.0.1:5000", None),
    ],
)
def test_which_tracking_uris_are_read_with_sqlite3(uri: str, path: str | None):
    assert sqlite_file(uri) == path


@pytest.mark.parametrize(
    ("artifact_uri", "folder"),
    [
        ("file:///tmp/mlruns/artifacts/1/abc/artifacts", Path("/tmp/mlruns/artifacts/1/abc/artifacts")),
        ("file:///tmp/with%20space/artifacts", Path("/tmp/with space/artifacts")),
        ("/tmp/mlruns/1/abc/artifacts", Path("/tmp/mlruns/1/abc/artifacts")),  # older stores: a bare path
        ("mlflow-artifacts:/1/abc/artifacts", None),  # a server's: MlflowClient logs these
        ("s3://bucket/1/abc/artifacts", None),
        ("file://otherhost/share/artifacts", None),
        ("", None),
        (None, None),
    ],
)
def test_only_local_artifact_folders_are_written_directly(artifact_uri: str | None, folder: Path | None):
    assert _local_folder(artifact_uri) == folder


def test_a_damaged_local_store_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # Read with sqlite3 now: its errors are the user's store, said in one line (exit 2), like SQLAlchemy's were.
    from batchscope.sweeps.cli import main

    root = tmp_path / "stores"
    make_synthetic_sweep(root, SPEC)
    (root / "mlflow.db").write_bytes(b"not a database " * 200)
    uri = f"sqlite:///{root}/mlflow.db"
    argv = ["report", SPEC.study_name, "--storage", str(root / "optuna.journal"), "--tracking-uri", uri]
    capsys.readouterr()  # what making the stores logged
    code = main([*argv, "--out", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"the MLflow store '{uri}' could not be read" in err and "not a database" in err, err

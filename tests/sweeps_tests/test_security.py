"""Credentials never leak; unreachable stores are one clear line; names cannot escape their folder."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient

from sweeps.cli import main
from sweeps.stores import redact, safe_name
from tests.conftest import small_config, write_config

SECRET = "Pl4ntedS3cretXYZ"


def test_planted_password_appears_nowhere(workdir: Path, pg_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Trust auth accepts any password, so a real sweep runs against PostgreSQL with a planted one.
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/{pg_database}"
    cfg = small_config("leak")
    cfg["train"]["max_steps"] = 20
    cfg["search"]["n_trials"] = 2
    cfg["storage"] = url
    path = write_config(workdir / "leak.yaml", cfg)
    assert main(["sweep", str(path), "--no-report"]) == 0
    assert main(["status", "leak", "--storage", url]) == 0
    # An error that involves the URL does not show the password either.
    assert main(["status", "nope", "--storage", url]) == 2
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "***" in out.out + out.err  # the URL is shown redacted

    # MLflow: params and tags of every run.
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("leak")
    assert exp is not None
    for run in client.search_runs([exp.experiment_id]):
        text = repr(run.data.params) + repr(run.data.tags)
        assert SECRET not in text
    # Every file written under the working directory (stores, artifacts, checkpoints, reports) but the config.
    for f in workdir.rglob("*"):
        if f.is_file() and f != path:
            assert SECRET.encode() not in f.read_bytes(), f
    # The Optuna tables in PostgreSQL.
    conn = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{pg_database}")
    with conn, conn.cursor() as cur:
        for table in (
            "study_user_attributes",
            "study_system_attributes",
            "trial_user_attributes",
            "trial_system_attributes",
            "studies",
        ):
            cur.execute(f"SELECT * FROM {table}")
            assert SECRET not in repr(cur.fetchall()), table
    conn.close()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("storage", f"postgresql://postgres:{SECRET}@127.0.0.1:1/none", "storage"),
        ("tracking_uri", "http://127.0.0.1:1", "tracking_uri"),
        ("storage", "mongodb://127.0.0.1/x", "unsupported scheme"),
    ],
)
def test_unreachable_store_is_one_line_and_creates_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], key: str, value: str, fragment: str
) -> None:
    path = write_config(workdir / "c.yaml", small_config("unreachable"))
    code = main(["sweep", str(path), "--no-report", "--set", f"{key}={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1, err
    assert SECRET not in err
    assert not (workdir / "mlruns").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p%40ss@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql+psycopg2://user:pw@host/db", "postgresql+psycopg2://user:***@host/db"),
        ("http://alice:secret@mlflow:5000", "http://alice:***@mlflow:5000"),
        ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "x<script>alert(1)</script>", "/abs", ""])
def test_study_names_cannot_escape_their_folder(tmp_path: Path, name: str) -> None:
    safe = safe_name(name)
    assert "/" not in safe and safe not in ("", ".", "..")
    assert (tmp_path / safe).resolve().parent == tmp_path.resolve()

"""Scale out against real services on this machine: PostgreSQL studies, several workers, an MLflow server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from batchscope.sweeps.cli import main
from tests.conftest import small_config, write_config


def _cfg(study: str, n_trials: int) -> dict:
    cfg = small_config(study)
    cfg["train"].update({"max_steps": 30, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"]["n_trials"] = n_trials
    cfg["heartbeat"] = {"interval_s": 1, "grace_s": 4}
    return cfg


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BATCHSCOPE_ROOT=str(workdir / "mlruns"), PYTHONUNBUFFERED="1")
    return env


def _worker(config: Path, url: str, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "batchscope.sweeps.cli", "worker", str(config), "--storage", url],
        env=_env(workdir),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _trial_runs(tracking_uri: str, study: str) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study)
    assert exp is not None
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("batchscope.role") == "trial"]


def _running_trial(url: str, study_name: str, timeout_s: float) -> optuna.trial.FrozenTrial | None:
    """Wait for a trial that has its MLflow run, watching only the PostgreSQL study.

    The test must not open the SQLite MLflow store while the worker creates it: a second
    process running MLflow's migrations at the same moment (outside the worker's lock) broke
    the worker's ("expected to match one row ... in 'alembic_version'"). A trial holds a run
    id only once the store is whole.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name=study_name, storage=url)
        except KeyError:  # the study is not created yet
            continue
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
        if running:
            return running[0]
    return None


def test_three_workers_share_one_postgres_study(workdir: Path, pg_database: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    config = write_config(workdir / "w.yaml", _cfg("shared", 12))
    procs = [_worker(config, url, workdir) for _ in range(3)]
    logs = [p.communicate(timeout=480)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
        assert "Traceback" not in log
    study = optuna.load_study(study_name="shared", storage=url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 12  # the study's total across workers, not per worker
    runs = _trial_runs(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}", "shared")
    assert len(runs) == 12
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == sorted(t.number for t in complete)
    assert all(r.info.status == "FINISHED" for r in runs)
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) >= 2  # the work was shared
    # Each worker samples with its own seed: with one seed, trials 0, 1 and 2 of three workers
    # had identical parameters. The random sampler repeats a continuous lr only by accident.
    sampled = [(t.params["batch_size"], t.params["lr"]) for t in study.trials if t.params]
    assert len(set(sampled)) == len(sampled), sampled
    assert len({t.user_attrs["sampler_seed"] for t in study.trials}) == 3


def test_sigterm_to_a_worker_leaves_its_trial_failed_and_queued(workdir: Path, pg_database: str) -> None:
    """Slurm and Kubernetes stop a job with SIGTERM: the worker marks its trial and ends its run."""
    url = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    cfg = _cfg("termed", 2)
    cfg["train"]["max_steps"] = 20000
    config = write_config(workdir / "t.yaml", cfg)
    proc = _worker(config, url, workdir)
    tracking = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    assert _running_trial(url, "termed", 120) is not None, "the worker never started a trial"
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=90)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "terminated" in out, out
    study = optuna.load_study(study_name="termed", storage=url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert study.get_trials(states=(TrialState.WAITING,))  # queued to re-run with its parameters
    assert all(r.info.status != "RUNNING" for r in _trial_runs(tracking, "termed"))


def test_a_killed_worker_trial_is_rerun_by_another(workdir: Path, pg_database: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    cfg = _cfg("killed", 6)
    cfg["train"]["max_steps"] = 200  # long enough to be killed mid-trial
    config = write_config(workdir / "k.yaml", cfg)
    victim = _worker(config, url, workdir)
    victim_trial = _running_trial(url, "killed", 180)
    assert victim_trial is not None, "the first worker never started a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    survivor = _worker(config, url, workdir)
    log = survivor.communicate(timeout=480)[0].decode()
    assert survivor.returncode == 0, log

    study = optuna.load_study(study_name="killed", storage=url)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6
    dead = study.trials[victim_trial.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["status"] == "failed"
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim_trial.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == dead.params
    runs = _trial_runs(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}", "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed_run = next(r for r in runs if r.info.run_id == dead.user_attrs["mlflow_run_id"])
    assert killed_run.info.status in ("KILLED", "FAILED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(workdir: Path, pg_database: str) -> str:
    port = _free_port()
    backend = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchscope.sweeps.cli",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(workdir / "server-artifacts"),
            "--port",
            str(port),
        ],
        env=_env(workdir),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode() if proc.stdout else "server exited") from None
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise AssertionError("the MLflow server did not come up in 120 s")
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_sweep_logs_through_an_mlflow_server_and_the_report_reads_it(
    workdir: Path, mlflow_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg("served", 2)
    cfg["tracking_uri"] = mlflow_server
    config = write_config(workdir / "s.yaml", cfg)
    assert main(["sweep", str(config), "--no-report"]) == 0
    runs = _trial_runs(mlflow_server, "served")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert main(["server", "--check", mlflow_server]) == 0
    assert main(["report", "served", "--tracking-uri", mlflow_server, "--out", str(workdir / "reports")]) == 0
    html = (workdir / "reports" / "served" / "index.html").read_text()
    assert "served" in html and "<img" in html
    # The report was logged to the sweep's parent run on the server.
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("served")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("batchscope.role") == "sweep")  # type: ignore[union-attr]
    assert any("index.html" in a.path for a in client.list_artifacts(parent.info.run_id, "report"))


def test_worker_without_a_shared_storage_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(workdir / "w.yaml", _cfg("solo", 2))
    assert main(["worker", str(config)]) == 2
    assert "--storage" in capsys.readouterr().err


def test_processes_starting_together_on_a_new_postgres_mlflow_store_all_run(workdir: Path, pg_database: str) -> None:
    """Each process that opened a new MLflow database ran MLflow's migrations: of three workers
    started together, two died with a traceback (duplicate key ... alembic_version). The schema
    is now made under a lock the database holds; `batchscope train` opens the store as a worker does."""
    cfg = _cfg("fresh", 1)
    cfg["tracking_uri"] = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    config = write_config(workdir / "t.yaml", cfg)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "batchscope.sweeps.cli", "train", str(config), "--seed", str(seed)],
            env=_env(workdir),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for seed in range(3)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
        assert "Traceback" not in log
    client = MlflowClient(cfg["tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)

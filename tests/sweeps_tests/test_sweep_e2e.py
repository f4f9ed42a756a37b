"""A short sweep end to end: real Optuna study, real MLflow store, real training."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config

CHILD_PARAMS = {
    "batch_size",
    "micro_batch_size",
    "accum_steps",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "seed",
    "trainer",
    "model",
    "dataset",
    "max_steps",
    "device",
    "precision",
    "lr_scaling",
}
HISTORIES = {
    "train/loss",
    "train/loss_min",
    "train/loss_max",
    "lr",
    "val/loss",
    "val/acc",
    "gns/grad_sq",
    "gns/trace_sigma",
    "perf/samples_per_s",
    "mem/peak_mb",
}
LOSS = ("train/loss_min", "train/loss", "train/loss_max")
FINALS = {
    "final/train_loss",
    "final/train_acc",
    "final/val_loss",
    "final/val_acc",
    "final/gen_gap",
    "final/sharpness",
    "final/wall_s",
}


def _journal(workdir: Path) -> optuna.storages.JournalStorage:
    return journal_storage(workdir / "mlruns" / "optuna.journal")


@pytest.fixture(scope="module")
def _swept_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real sweep for the whole module; each test gets its own copy of the stores."""
    base = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("BATCHSCOPE_ROOT", str(base / "mlruns"))
        path = write_config(base / "sweep.yaml", small_config("e2e"))
        assert main(["sweep", str(path), "--no-report"]) == 0
    return base


@pytest.fixture
def swept(workdir: Path, _swept_once: Path) -> Path:
    import shutil

    shutil.copytree(_swept_once / "mlruns", workdir / "mlruns")
    return Path(shutil.copy(_swept_once / "sweep.yaml", workdir / "sweep.yaml"))


def test_sweep_fills_both_stores_as_the_contract_says(workdir: Path, swept: Path) -> None:
    study = optuna.load_study(study_name="e2e", storage=_journal(workdir))
    trials = study.get_trials()
    assert len(trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("batchscope.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("batchscope.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert all(r.info.status != "RUNNING" for r in runs)
    by_id = {r.info.run_id: r for r in children}
    for t in trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna.study"] == "e2e"
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["batchscope.status"] == "ok"
        assert set(run.data.params) >= CHILD_PARAMS
        assert int(run.data.params["batch_size"]) == t.params["batch_size"]
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert set(run.data.metrics) >= FINALS
        assert run.data.metrics["final/tail_val_loss"] == pytest.approx(t.value)  # the objective
        for key in HISTORIES:
            assert client.get_metric_history(run.info.run_id, key), key
        # By default one train/loss row per logging window (10 steps; every step under
        # train.log_every_step, see test_reliability's resume test), at the window's last step.
        rows = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in LOSS}
        assert [s for s, _ in rows["train/loss"]] == list(range(10, 61, 10))  # each window once, no duplicates
        for (s, low), (_, mean), (_, high) in zip(*(rows[k] for k in LOSS), strict=True):
            assert low <= mean <= high, s


def test_running_again_continues_to_n_trials(workdir: Path, swept: Path) -> None:
    assert main(["sweep", str(swept), "--no-report", "--n-trials", "5"]) == 0
    study = optuna.load_study(study_name="e2e", storage=_journal(workdir))
    trials = study.get_trials()
    assert len(trials) == 5  # 3 from before + 2 new, none re-run
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == 5
    # Same command again: already at 5, nothing new.
    assert main(["sweep", str(swept), "--no-report", "--n-trials", "5"]) == 0
    assert len(optuna.load_study(study_name="e2e", storage=_journal(workdir)).get_trials()) == 5
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])  # type: ignore[union-attr]
    assert len([r for r in runs if r.data.tags.get("batchscope.role") == "trial"]) == 5
    assert len([r for r in runs if r.data.tags.get("batchscope.role") == "sweep"]) == 1


def test_changed_search_space_is_refused(workdir: Path, swept: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", str(swept), "--no-report", "--set", "search.batch_size.values=[8, 32]"])
    err = capsys.readouterr().err
    assert code == 2
    assert "different setup" in err and "--force" in err


def test_status_lists_the_trials(workdir: Path, swept: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["status", "e2e"]) == 0
    text = capsys.readouterr().out
    assert "COMPLETE" in text and "batch_size" in text


def test_train_command_logs_one_run(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(workdir / "one.yaml", small_config("single"))
    assert main(["train", str(path), "--batch-size", "32", "--lr", "0.1"]) == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("single")
    runs = client.search_runs([exp.experiment_id])  # type: ignore[union-attr]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "32"
    assert "final/val_acc" in run.data.metrics


def test_optuna_dashboard_serves_the_study_with_its_objective_named(workdir: Path, swept: Path) -> None:
    """`batchscope ui --optuna` starts optuna-dashboard (its public run_server) on the journal."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("optuna_dashboard")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [sys.executable, "-m", "batchscope.sweeps.cli", "ui", "--optuna", "--port", str(port)]
    env = dict(os.environ, BATCHSCOPE_ROOT=str(workdir / "mlruns"))
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    summaries = json.load(r)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer in 60 s"
                time.sleep(0.3)
        (study,) = [s for s in summaries if s["study_name"] == "e2e"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=5) as r:
            detail = json.load(r)
        assert detail["objective_names"] == ["val_loss"]  # not "Objective 0"
        assert len(detail["trials"]) == 3
        # The batch-size axis of its plots: an int on a log scale, drawn in order (a categorical's
        # choices are merged through a set and drawn as unordered labels: 256, 16, 64).
        ordered = {"type": "IntDistribution", "low": 16, "high": 256, "step": 1, "log": True}
        for space in ("intersection_search_space", "union_search_space"):
            assert {p["name"]: p["distribution"] for p in detail[space]}["batch_size"] == ordered, space
        for t in detail["trials"]:
            (batch,) = [p for p in t["params"] if p["name"] == "batch_size"]
            # The value plotted is the batch size itself (a categorical plots its choice's index).
            assert batch["param_internal_value"] == int(batch["param_external_value"]) in (16, 64, 256)
    finally:
        # As a job system stops it (SIGINT may be ignored under a test runner's workers): the
        # dashboard goes with it, so the pipe closes and the port is free.
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out, out


def test_mlflow_shows_the_sweep_as_its_users_expect(workdir: Path, swept: Path) -> None:
    """Classic runs view, runs named by what tells them apart, the parent carrying the sweep's state."""
    study = optuna.load_study(study_name="e2e", storage=_journal(workdir))
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    assert exp is not None
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI/traces view
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("batchscope.role") == "sweep"]
    by_id = {r.info.run_id: r for r in runs}
    for t in study.trials:
        name = by_id[t.user_attrs["mlflow_run_id"]].info.run_name
        assert name == f"bs={t.params['batch_size']} lr={t.params['lr']:.3g} #{t.number}", name
    history = client.get_metric_history(parent.info.run_id, "sweep/trials_finished")
    assert sorted(m.value for m in history) == [1.0, 2.0, 3.0]
    assert [m.step for m in sorted(history, key=lambda m: m.value)] == [1, 2, 3]
    assert parent.data.metrics["sweep/trials_complete"] == 3
    best = client.get_metric_history(parent.info.run_id, "sweep/best_val_loss")
    assert max(best, key=lambda m: m.step).value == pytest.approx(study.best_value)
    by_step = [m.value for m in sorted(best, key=lambda m: m.step)]
    assert by_step == sorted(by_step, reverse=True)  # val_loss: the best so far only improves

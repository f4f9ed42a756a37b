"""A sweep whose trials train in two processes each (torchrun, gloo on the CPU), end to end."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config
from tests.sweeps_tests.test_sweep_e2e import CHILD_PARAMS, FINALS, HISTORIES

STEPS = 30


def test_sweep_with_two_processes_per_trial_fills_the_stores_as_the_contract_says(workdir: Path) -> None:
    cfg = small_config(
        "ddp",
        train={
            "max_steps": STEPS,
            "eval_every": 10,
            "sharpness": {"iters": 5},
            "distributed": {"nproc": 2},
        },
        search={"batch_size": {"values": [16, 64]}, "lr": {"values": [0.05]}, "n_trials": 2, "sampler": "random"},
    )
    path = write_config(workdir / "sweep.yaml", cfg)
    assert main(["sweep", str(path), "--no-report"]) == 0

    study = optuna.load_study(study_name="ddp", storage=journal_storage(workdir / "mlruns" / "optuna.journal"))
    trials = study.get_trials()
    assert len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.user_attrs for t in trials]

    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ddp")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    children = {r.info.run_id: r for r in runs if r.data.tags.get("batchscope.role") == "trial"}
    assert len(children) == len(trials)  # exactly one child run per trial
    for t in trials:
        run = children[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["batchscope.status"] == "ok"
        assert set(run.data.params) >= CHILD_PARAMS
        assert run.data.params["world_size"] == "2"
        # What each process's forward pass sees (BatchNorm statistics depend on it), as the trainer
        # resolved it: half the batch, not the whole batch the sweep used to guess.
        assert int(run.data.params["micro_batch_size"]) == t.params["batch_size"] // 2
        assert run.data.params["accum_steps"] == "1"
        assert set(run.data.metrics) >= FINALS
        # The objective: the mean of the last evaluations, read from MLflow (DDP evaluations skip the sweep).
        evals = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss"))
        tail = [v for _, v in evals[-4:]]
        assert run.data.metrics["final/tail_val_loss"] == pytest.approx(sum(tail) / len(tail))
        assert run.data.metrics["final/tail_val_loss"] == pytest.approx(t.value)
        # The raw noise-scale measurements (in HISTORIES); the windowed gns/b_simple only where its
        # mean |G|² is 3 s.e. clear of 0, which a run this short need not reach.
        for key in HISTORIES:
            assert client.get_metric_history(run.info.run_id, key), key
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(10, STEPS + 1, 10))  # each logging window's row once, from rank 0 only

"""Checkpoints of finished trials are kept or pruned as configured; kept final weights are MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from sweeps.cli import main
from sweeps.stores import journal_storage
from tests.conftest import small_config, write_config


@pytest.mark.parametrize("keep", ["best", "all", "none"])
def test_keep_policy(workdir: Path, keep: str) -> None:
    cfg = small_config(f"keep-{keep}")
    cfg["train"].update(
        {
            "max_steps": 20,
            "eval_every": 10,
            "sharpness": {"enabled": False},
            "checkpoint": {"every_steps": 10, "keep": keep},
        }
    )
    cfg["search"]["n_trials"] = 3
    assert main(["sweep", str(write_config(workdir / "k.yaml", cfg)), "--no-report"]) == 0
    study = optuna.load_study(study_name=f"keep-{keep}", storage=journal_storage(workdir / "mlruns" / "optuna.journal"))
    files = sorted(p.name for p in (workdir / "mlruns" / "checkpoints" / f"keep-{keep}").glob("*.pt"))
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")

    def has_weights(trial: optuna.trial.FrozenTrial) -> bool:
        return any(
            a.path == "weights/model.pt" for a in client.list_artifacts(trial.user_attrs["mlflow_run_id"], "weights")
        )

    if keep == "none":
        assert files == []
        assert not any(has_weights(t) for t in study.trials)
    elif keep == "all":
        assert files == [f"trial-{t.number}-seed-0.pt" for t in study.trials]
        assert all(has_weights(t) for t in study.trials)
    else:
        assert files == [f"trial-{study.best_trial.number}-seed-0.pt"]
        assert has_weights(study.best_trial)
        # The logged weights load into the model with weights_only=True.
        path = client.download_artifacts(study.best_trial.user_attrs["mlflow_run_id"], "weights/model.pt")
        state = torch.load(path, weights_only=True)
        assert any(k.endswith("weight") for k in state)

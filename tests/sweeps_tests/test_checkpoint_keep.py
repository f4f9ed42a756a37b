"""Checkpoints of finished trials are kept or pruned as configured; kept final weights are MLflow artifacts."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
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


def test_the_worker_writes_weights_from_a_checkpoint_or_says_why_not(tmp_path: Path) -> None:
    from batchscope.sweeps.worker import TrialWorker
    from batchscope.trainers.checkpoint import FORMAT_VERSION, export_weights

    model = torch.nn.Linear(3, 2)
    ckpt = tmp_path / "trial.pt"
    torch.save({"format": FORMAT_VERSION, "objects": {"model": model.state_dict()}}, ckpt)
    worker = TrialWorker()
    try:
        worker.export_weights(ckpt, tmp_path / "model.pt")
        state = torch.load(tmp_path / "model.pt", weights_only=True)
        assert torch.equal(state["weight"], model.weight.detach())
        with pytest.raises(RuntimeError, match=r"missing\.pt"):
            worker.export_weights(tmp_path / "missing.pt", tmp_path / "other.pt")
        assert worker.alive()  # a failed request leaves the worker usable
    finally:
        worker.close()
    export_weights(ckpt, tmp_path / "again.pt")  # the sweep's fallback, in this process
    assert torch.equal(torch.load(tmp_path / "again.pt", weights_only=True)["bias"], model.bias.detach())

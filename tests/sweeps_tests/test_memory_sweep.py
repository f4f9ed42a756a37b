"""A search space that reaches past memory: out-of-memory trials end as `oom`, or batches are accumulated."""

from __future__ import annotations

from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config


def _runs(workdir: Path, study: str) -> dict[int, object]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs if r.data.tags.get("batchscope.role") == "trial"}


def test_a_batch_past_a_real_memory_limit_ends_as_oom_and_the_sweep_goes_on(workdir: Path) -> None:
    cfg = small_config("oom")
    cfg["trainer"]["hidden"] = 2048
    cfg["train"].update({"max_steps": 4, "eval_every": 2, "sharpness": {"enabled": False}, "memory_limit_mb": 1500})
    # 262144 examples × 2048 hidden units × 4 bytes is 2 GB per activation: past the 1.5 GB cap.
    cfg["search"].update(
        {"sampler": "grid", "n_trials": 2, "batch_size": {"values": [16, 262144]}, "lr": {"values": [0.01]}}
    )
    assert main(["sweep", str(write_config(workdir / "o.yaml", cfg)), "--no-report"]) == 0
    study = optuna.load_study(study_name="oom", storage=journal_storage(workdir / "mlruns" / "optuna.journal"))
    by_batch = {t.params["batch_size"]: t for t in study.trials}
    assert by_batch[262144].user_attrs["status"] == "oom"
    assert by_batch[262144].state == TrialState.PRUNED  # counted, and the sampler learns the region is bad
    assert "out of memory" in by_batch[262144].user_attrs["reason"]
    assert by_batch[16].state == TrialState.COMPLETE
    runs = _runs(workdir, "oom")
    oom_run = runs[by_batch[262144].number]
    assert oom_run.data.tags["batchscope.status"] == "oom" and oom_run.info.status == "FAILED"  # type: ignore[attr-defined]


def test_micro_batch_auto_accumulates_batches_that_do_not_fit(workdir: Path) -> None:
    cfg = small_config("accum")
    cfg["train"].update({"max_steps": 4, "eval_every": 2, "sharpness": {"enabled": False}, "micro_batch_size": "auto"})
    cfg["search"].update(
        {"sampler": "grid", "n_trials": 2, "batch_size": {"values": [16, 2048]}, "lr": {"values": [0.01]}}
    )
    assert main(["sweep", str(write_config(workdir / "a.yaml", cfg)), "--no-report"]) == 0
    study = optuna.load_study(study_name="accum", storage=journal_storage(workdir / "mlruns" / "optuna.journal"))
    fits = study.user_attrs["batchscope.autobatch"]["batch_size"]
    assert 16 < fits < 2048  # capped by the 960 training examples (or by memory)
    runs = _runs(workdir, "accum")
    for t in study.trials:
        params = runs[t.number].data.params  # type: ignore[attr-defined]
        assert t.state == TrialState.COMPLETE
        if t.params["batch_size"] == 2048:
            assert int(params["micro_batch_size"]) == fits  # split into micro-batches…
            assert int(params["accum_steps"]) == -(-2048 // fits)
            assert int(params["batch_size"]) == 2048  # …with the effective batch unchanged
        else:
            assert int(params["micro_batch_size"]) == 16 and params["accum_steps"] == "1"

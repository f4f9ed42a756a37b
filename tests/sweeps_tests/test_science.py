"""Sweep-level science: seeds as repeats, objectives, the logged lr, the noise-scale command.

The lr scaling rules and schedules themselves are tested in tests/trainers_tests/test_schedule.py."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config


def _study(workdir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(workdir / "mlruns" / "optuna.journal"))


def _runs(workdir: Path, name: str) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("batchscope.role") == "trial"]


def test_seeds_are_separate_runs_and_the_objective_is_their_mean(workdir: Path) -> None:
    cfg = small_config("seeds")
    cfg["train"].update({"max_steps": 20, "eval_every": 10, "seeds": [0, 1], "sharpness": {"enabled": False}})
    cfg["train"]["target"] = {"metric": "val/acc", "value": 0.12}  # reached early: steps to target per seed
    cfg["search"]["n_trials"] = 2
    assert main(["sweep", str(write_config(workdir / "s.yaml", cfg)), "--no-report"]) == 0
    study = _study(workdir, "seeds")
    runs = _runs(workdir, "seeds")
    assert len(runs) == 4  # 2 trials × 2 seeds
    for t in study.trials:
        mine = [r for r in runs if r.data.tags["optuna.trial_number"] == str(t.number)]
        assert sorted(r.data.tags["batchscope.seed"] for r in mine) == ["0", "1"]
        assert sorted(t.user_attrs["mlflow_run_ids"]) == sorted(r.info.run_id for r in mine)
        mean = sum(r.data.metrics["final/tail_val_loss"] for r in mine) / 2
        assert t.value == pytest.approx(mean)
        # The pruner judges a trial on its first seed, so the best's first seed is kept too.
        (seed0,) = [r for r in mine if r.data.tags["batchscope.seed"] == "0"]
        assert t.user_attrs["first_seed_steps_to_target"] == pytest.approx(seed0.data.metrics["final/steps_to_target"])


def test_two_objectives_give_a_pareto_front(workdir: Path) -> None:
    cfg = small_config("pareto")
    cfg["train"].update({"max_steps": 30, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["train"]["target"] = {"metric": "val/acc", "value": 0.12}
    cfg["search"].update({"n_trials": 3, "objective": ["val_loss", "time_to_target"]})
    assert main(["sweep", str(write_config(workdir / "p.yaml", cfg)), "--no-report"]) == 0
    study = _study(workdir, "pareto")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert study.best_trials  # a Pareto front
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert len(t.values) == 2


def test_accuracy_objective_is_the_mean_of_the_last_evaluations_and_maximized(workdir: Path) -> None:
    cfg = small_config("acc")
    cfg["train"].update({"max_steps": 50, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"].update({"n_trials": 2, "objective": "val_acc", "objective_evals": 3})
    assert main(["sweep", str(write_config(workdir / "a.yaml", cfg)), "--no-report"]) == 0
    study = _study(workdir, "acc")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    runs = {r.info.run_id: r for r in _runs(workdir, "acc")}
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/acc"))
        assert [step for step, _ in history] == [0, 10, 20, 30, 40, 50]  # 0: at initialization (a target is set)
        last3 = sum(v for _, v in history[-3:]) / 3
        assert runs[run_id].data.metrics["final/tail_val_acc"] == pytest.approx(last3)
        assert t.value == pytest.approx(last3)


def test_logged_lr_follows_scaling_and_warmup(workdir: Path) -> None:
    cfg = small_config("lrs")
    cfg["train"].update(
        {
            "max_steps": 40,
            "eval_every": 20,
            "sharpness": {"enabled": False},
            "lr_scaling": {"rule": "linear", "reference_batch": 32, "warmup_steps": 20},
        }
    )
    cfg["search"].update({"n_trials": 1, "batch_size": {"values": [64]}, "lr": {"values": [0.05]}})
    assert main(["sweep", str(write_config(workdir / "l.yaml", cfg)), "--no-report"]) == 0
    (run,) = _runs(workdir, "lrs")
    assert float(run.data.params["lr"]) == 0.05
    assert float(run.data.params["effective_lr"]) == pytest.approx(0.1)  # 0.05 × 64/32
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs[10] == pytest.approx(0.1 * 11 / 20)  # warming up
    assert lrs[40] == pytest.approx(0.1)  # after warmup


def test_noise_scale_command(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(workdir / "n.yaml", small_config("ns"))
    assert main(["noise-scale", str(path), "--b-big", "256", "--b-small", "32", "--batches", "16"]) == 0
    text = capsys.readouterr().out
    assert "B_simple" in text and "initialization" in text
    value = float(next(line for line in text.splitlines() if "B_simple" in line).split("│")[2])
    assert math.isfinite(value) and value > 0
    assert "from 16 pairs" in text and "target" not in text
    # By default pairs are drawn until ±10%; a target out of reach says so and what to do.
    assert main(["noise-scale", str(path)]) == 0
    assert "target ±10%" in capsys.readouterr().out
    assert main(["noise-scale", str(path), "--precision", "0.001", "--max-batches", "32"]) == 0
    text = capsys.readouterr().out
    assert "from 32 pairs" in text and "not reached" in text and "--max-batches" in text
    assert main(["noise-scale", str(path), "--precision", "0"]) == 2
    assert main(["noise-scale", str(path), "--max-batches", "8"]) == 2
    assert main(["noise-scale", str(path), "--b-big", "8", "--b-small", "32"]) == 2
    assert main(["noise-scale", str(path), "--checkpoint", "missing.pt"]) == 2


def test_grid_sampler_runs_the_whole_grid_once(workdir: Path) -> None:
    cfg = small_config("grid")
    cfg["train"].update({"max_steps": 10, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"].update(
        {"sampler": "grid", "n_trials": 10, "batch_size": {"values": [16, 64]}, "lr": {"values": [0.01, 0.1]}}
    )
    assert main(["sweep", str(write_config(workdir / "g.yaml", cfg)), "--no-report"]) == 0
    study = _study(workdir, "grid")
    cells = sorted((t.params["batch_size"], t.params["lr"]) for t in study.trials)
    assert cells == [(16, 0.01), (16, 0.1), (64, 0.01), (64, 0.1)]  # capped at the grid's 4 cells

"""One trial of each new recipe through `batchscope sweep`: real Optuna, real MLflow, the shipped configs shrunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run

from batchscope.sweeps.cli import main
from tests.conftest import write_config
from tests.sweeps_tests.test_sweep_e2e import CHILD_PARAMS
from tests.trainers_tests.cifar_fixtures import write_fake_cifar10

CONFIGS = Path(__file__).parents[2] / "sweeps" / "configs"
EXAMPLE = "tests.trainers_tests.example_recipe"


def shrunk(name: str, trainer: dict[str, Any] | None = None, target: dict[str, Any] | None = None) -> dict[str, Any]:
    """A shipped config cut down to one short trial on the CPU."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    cfg["trainer"].update(trainer or {})
    train = cfg["train"]
    for budget in ("max_steps", "max_samples", "max_epochs"):
        train.pop(budget, None)
    train.update(max_steps=6, eval_every=3, sharpness={"iters": 2})
    train["lr_scaling"] = {"rule": "none"}
    if target is not None:
        train["target"] = target
    cfg["search"] = {
        "batch_size": {"values": [16]},
        "lr": {"values": [0.01]},
        "sampler": "random",
        "n_trials": 1,
        "objective": "val_loss",
    }
    cfg["device"] = "cpu"
    return cfg


def only_trial_run(workdir: Path, study: str) -> Run:
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("batchscope.role") == "trial"]
    assert len(children) == 1
    assert all(r.info.status != "RUNNING" for r in runs)
    return children[0]


def sweep_one(workdir: Path, cfg: dict[str, Any]) -> Run:
    path = write_config(workdir / "sweep.yaml", cfg)
    assert main(["sweep", str(path), "--no-report"]) == 0
    run = only_trial_run(workdir, cfg["study"])
    assert run.data.tags["batchscope.status"] == "ok", run.data.tags.get("batchscope.reason")
    # The runner logs momentum for SGD only (AdamW has none).
    expected = CHILD_PARAMS - {"momentum"} if cfg["train"].get("optimizer") == "adamw" else CHILD_PARAMS
    assert set(run.data.params) >= expected
    assert "final/val_loss" in run.data.metrics
    assert run.data.params["trainer"] == cfg["trainer"]["recipe"]
    return run


def test_digits_trial_is_tracked(workdir: Path) -> None:
    run = sweep_one(workdir, shrunk("digits_batchnorm.yaml", trainer={"channels": 4}))
    assert run.data.params["model"] == "cnn"
    assert "norm=batch" in run.data.params["dataset"]
    assert "final/val_acc" in run.data.metrics


def test_cifar10_trial_is_tracked(workdir: Path) -> None:
    # The shipped config reads ./data/cifar-10-batches-py: write small files in the real format there.
    write_fake_cifar10(workdir / "data" / "cifar-10-batches-py", n_per_batch=32, seed=0)
    run = sweep_one(workdir, shrunk("cifar10_resnet.yaml", trainer={"width": 2, "train_batches": 1}))
    assert run.data.params["model"] == "resnet9"
    assert "final/val_acc" in run.data.metrics


def test_charlm_trial_logs_tokens_and_perplexity(workdir: Path) -> None:
    (workdir / "data").mkdir()
    (workdir / "data" / "input.txt").write_text("to be or not to be, that is the question. " * 60, encoding="utf-8")
    small = {"seq_len": 16, "d_model": 16, "n_layers": 1, "n_heads": 2}
    run = sweep_one(workdir, shrunk("charlm_transformer.yaml", trainer=small))
    assert run.data.params["tokens_per_batch"] == str(16 * 16)
    assert "final/val_ppl" in run.data.metrics
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    # Step 0: the evaluation at initialization that anchors steps to target.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/ppl")] == [0, 3, 6]


def test_user_recipe_by_import_path_trial_is_tracked(workdir: Path) -> None:
    cfg = shrunk(
        "digits_batchnorm.yaml",
        target={"metric": "val/loss", "value": 0.5},
    )
    cfg["study"] = "teacher-student"
    cfg["trainer"] = {"recipe": f"{EXAMPLE}:build", "model": "mlp", "dim": 4, "n_examples": 200}
    run = sweep_one(workdir, cfg)
    assert run.data.params["trainer"] == f"{EXAMPLE}:build"
    assert "final/val_acc" not in run.data.metrics  # a regression


@pytest.mark.parametrize(
    ("trainer", "target", "message"),
    [
        ({"recipe": "no_such_package.recipes:build"}, None, "cannot import module 'no_such_package.recipes'"),
        ({"recipe": f"{EXAMPLE}:nothing"}, None, "has no attribute 'nothing'"),
        ({"recipe": f"{EXAMPLE}:RECIPE", "model": "cnn"}, None, "has no model 'cnn'"),
        ({"recipe": f"{EXAMPLE}:RECIPE", "model": "mlp", "dimm": 3}, None, "dimm"),
        ({"recipe": f"{EXAMPLE}:RECIPE", "model": "mlp"}, {"metric": "val/acc", "value": 0.5}, "val/acc"),
        ({"recipe": "charlm", "model": "transformer"}, None, "text_file"),
        ({"recipe": "digits", "model": "cnn"}, {"metric": "val/ppl", "value": 5.0}, "val/ppl"),
    ],
)
def test_bad_recipe_is_one_line_before_anything_runs(
    workdir: Path, capsys: pytest.CaptureFixture[str], trainer: dict, target: dict | None, message: str
) -> None:
    cfg = shrunk("digits_batchnorm.yaml")
    cfg["trainer"] = trainer
    cfg["train"].pop("target", None)
    if target is not None:
        cfg["train"]["target"] = target
    path = write_config(workdir / "bad.yaml", cfg)
    assert main(["sweep", str(path), "--no-report"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (workdir / "mlruns").exists()

"""Recipes whose data streams (trainers.task.DataTask) through `batchscope sweep`: real Optuna, real MLflow.

Each form of data trains one short trial with the tracking contract: a Dataset of pairs with
the default collate (the image-folder example, reading PNG files), a Dataset of dicts with the
recipe's collate, step and metrics, and a factory of dict batches (the language-model example
on a text file). A sweep costs its worker's start (seconds): one trial per form, no more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from batchscope.sweeps.cli import main
from tests.conftest import write_config
from tests.sweeps_tests.test_recipes_sweep import shrunk, sweep_one
from tests.sweeps_tests.test_sweep_e2e import FINALS, HISTORIES

RECIPE = "tests.trainers_tests.data_recipes:build"
# What every trial logs whatever its data: the contract's histories and finals less accuracy.
CORE = (HISTORIES | FINALS) - {"val/acc", "final/train_acc", "final/val_acc"}


def sweep(workdir: Path, study: str, trainer: dict[str, Any], target: dict[str, Any]) -> Run:
    cfg = shrunk("digits_batchnorm.yaml", target=target)
    cfg["study"] = study
    cfg["trainer"] = trainer
    cfg["train"]["gns"] = {"every": 2}  # measured within the trial's 6 steps (micro-batches of the batch)
    run = sweep_one(workdir, cfg)
    assert set(run.data.metrics) >= CORE, CORE - set(run.data.metrics)
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    # The evaluation at initialization (step 0) anchors steps to target, then every eval_every.
    assert [m.step for m in client.get_metric_history(run.info.run_id, target["metric"])] == [0, 3, 6]
    return run


def test_dataset_with_collate_step_and_metrics_trains_a_tracked_trial(workdir: Path) -> None:
    trainer = {"recipe": RECIPE, "model": "mlp", "form": "collate", "n": 256}
    run = sweep(workdir, "data-collate", trainer, {"metric": "val/acc", "value": 0.5})
    # Accuracy from the recipe's own metrics: logged, aimed at, and measured at the end.
    assert {"val/acc", "final/train_acc", "final/val_acc"} <= set(run.data.metrics)


def test_image_folder_example_reads_png_files(workdir: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 100), ("val", 30)):
        for c, name in enumerate(("reddish", "bluish")):
            folder = workdir / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (8, 8, 3), dtype=np.uint8)
                pixels[..., 2 * c] += 120
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    trainer = {
        "recipe": "batchscope.trainers.recipes.image_folder:build",
        "model": "cnn",
        "data_dir": str(workdir / "images"),
        "image_size": 8,
        "width": 4,
    }
    run = sweep(workdir, "images", trainer, {"metric": "val/acc", "value": 0.9})
    assert {"val/acc", "final/val_acc"} <= set(run.data.metrics)


def test_token_lm_example_streams_dict_batches_and_counts_tokens(workdir: Path) -> None:
    text = workdir / "input.txt"
    text.write_text("to be or not to be, that is the question. " * 40, encoding="utf-8")
    trainer = {
        "recipe": "batchscope.trainers.recipes.token_lm:RECIPE",
        "model": "transformer",
        "text_file": str(text),
        "seq_len": 16,
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
    }
    run = sweep(workdir, "token-lm", trainer, {"metric": "val/ppl", "value": 300.0})
    assert run.data.metrics["perf/tokens_per_s"] > 0
    assert {"final/val_ppl", "final/tokens_to_target"} <= set(run.data.metrics)
    # Reached at initialization (uniform over 256 bytes: ppl 256 < 300): no tokens needed.
    assert run.data.metrics["final/tokens_to_target"] == 0.0


def test_a_tool_that_needs_tensors_refuses_a_datatask_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = shrunk("digits_batchnorm.yaml")
    cfg["trainer"] = {"recipe": RECIPE, "model": "mlp", "form": "stream"}
    path = write_config(workdir / "stream.yaml", cfg)
    assert main(["noise-scale", str(path)]) == 2
    err = capsys.readouterr().err
    assert "gives its data as a DataTask" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

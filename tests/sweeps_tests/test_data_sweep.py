"""Recipes whose data streams (trainers.task.DataTask) through `batchscope sweep`: real Optuna, real MLflow.

Each form of data trains one short trial with the tracking contract: a Dataset of pairs with
the default collate (the image-folder example, reading PNG files), a Dataset of dicts with the
recipe's collate, step and metrics, and a factory of dict batches (the language-model example
on a text file). A sweep costs its worker's start (seconds): one trial per form, no more.
The measurement commands take the same recipes: `noise-scale` and `throughput` on a stream
(against the same data in memory), and AutoBatch (`high: auto`) inside a sweep.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
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


def blobs_config(workdir: Path, study: str, **trainer: Any) -> Path:
    cfg = shrunk("digits_batchnorm.yaml")
    cfg["study"] = study
    cfg["trainer"] = {"recipe": RECIPE, "model": "mlp", **trainer}
    return write_config(workdir / f"{study}.yaml", cfg)


def b_simple(text: str) -> tuple[float, float]:
    """(estimate, standard error) from the noise-scale command's table."""
    row = next(line for line in text.splitlines() if "B_simple = tr" in line).split("│")
    return float(row[2]), float(row[3])


def one_line_refusal(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_noise_scale_and_throughput_commands_measure_a_stream(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The same 4096 blobs and initial model, in memory and as a factory of dict batches.
    memory = blobs_config(workdir, "memory", form="memory", n=4096)
    stream = blobs_config(workdir, "stream", form="stream", n=4096)
    sizes = ["--b-big", "256", "--b-small", "32"]
    assert main(["noise-scale", str(memory), *sizes]) == 0
    expected, expected_se = b_simple(capsys.readouterr().out)
    assert main(["noise-scale", str(stream), *sizes]) == 0
    out = capsys.readouterr().out
    got, got_se = b_simple(out)
    assert "corrected for its 4096 examples" in out  # an epoch was read whole: N is known
    assert math.isfinite(got) and abs(got - expected) <= 2 * math.hypot(got_se, expected_se), (got, expected)
    # A big batch the stream cannot give: one line saying what to change.
    assert main(["noise-scale", str(stream), "--b-big", "8192"]) == 2
    assert "lower --b-big" in one_line_refusal(capsys.readouterr().err)

    assert main(["throughput", str(stream), "--batch-sizes", "1,64", "--iters", "5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith(" ok")]
    assert [int(r[0]) for r in rows] == [1, 64]
    assert all(math.isfinite(float(r[1])) and float(r[1]) > 0 for r in rows)


def test_a_sweep_with_high_auto_probes_a_datatask(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # AutoBatch's probes train on the recipe's own dict batches and step; 256 examples fit.
    cfg = shrunk("digits_batchnorm.yaml")
    cfg["study"] = "auto-data"
    cfg["trainer"] = {"recipe": RECIPE, "model": "mlp", "form": "collate", "n": 256}
    cfg["search"]["batch_size"] = {"low": 16, "high": "auto"}
    cfg["train"]["micro_batch_size"] = "auto"
    run = sweep_one(workdir, cfg)
    assert "Traceback" not in capsys.readouterr().err
    study = optuna.load_study(study_name="auto-data", storage=journal_storage(workdir / "mlruns" / "optuna.journal"))
    assert study.user_attrs["batchscope.autobatch"]["batch_size"] == 256  # capped at the training set
    assert 16 <= int(run.data.params["batch_size"]) <= 256


def test_a_recipe_refusal_in_autobatch_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = shrunk("digits_batchnorm.yaml")
    cfg["trainer"] = {"recipe": RECIPE, "model": "mlp", "form": "collate", "bad": "per_example"}
    cfg["search"]["batch_size"] = {"low": 16, "high": "auto"}
    assert main(["sweep", str(write_config(workdir / "bad.yaml", cfg)), "--no-report"]) == 2
    err = one_line_refusal(capsys.readouterr().err)
    assert "AutoBatch" in err and "the loss must be the mean over the batch" in err

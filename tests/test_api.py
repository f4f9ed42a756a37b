"""The Python API (batchscope.sweep, load, report, noise_scale, autobatch), as a user's script calls it.

One real sweep for the module: docs/python.md's walk-through, run as a script without a main
guard (every trial failed so before: the spawned workers re-ran the script); the other tests
read its stores.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch

import batchscope
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config
from tests.walkthrough import STUDY, code_blocks, environment, work_folder


@dataclass(frozen=True)
class Walkthrough:
    cwd: Path  # where the script ran
    tmp: Path  # its TMPDIR
    script: str
    output: str  # stdout
    errors: str  # stderr
    returncode: int

    @property
    def store(self) -> Path:
        return work_folder(self.output) / "mlruns"


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Walkthrough:
    base = tmp_path_factory.mktemp("script")
    cwd, tmp = base / "cwd", base / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    script = "\n\n".join(code_blocks())
    path = base / "walkthrough.py"
    path.write_text(script, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(path)], cwd=cwd, env=environment(tmp), capture_output=True, text=True, timeout=600
    )
    return Walkthrough(cwd, tmp, script, done.stdout, done.stderr, done.returncode)


def test_the_walkthrough_runs_as_a_script_without_a_main_guard(walkthrough: Walkthrough) -> None:
    assert "__main__" not in walkthrough.script  # what this test is about
    assert walkthrough.returncode == 0, walkthrough.errors[-3000:]
    out = walkthrough.output
    assert "2 of 2 trials finished" in out
    assert "index.html ['summary.md']" in out
    assert "B_simple = " in out
    # Every trial trained (none "failed" because its worker re-ran the script), and progress was shown.
    assert walkthrough.errors.count(": ok") == 2, walkthrough.errors[-3000:]
    # It wrote under the temporary folder it printed, nothing where it ran.
    assert work_folder(out).parent == walkthrough.tmp
    assert list(walkthrough.cwd.iterdir()) == []


def test_load_reads_the_store_that_batchscope_root_names(
    walkthrough: Walkthrough, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./mlruns here: only BATCHSCOPE_ROOT says where the store is
    monkeypatch.setenv("BATCHSCOPE_ROOT", str(walkthrough.store))
    data = batchscope.load(STUDY)
    study = optuna.load_study(study_name=STUDY, storage=journal_storage(walkthrough.store / "optuna.journal"))
    # The walk-through's random sampler may draw one batch size twice: compare with Optuna's own trials.
    assert sorted(data.trials["batch_size"]) == sorted(t.params["batch_size"] for t in study.trials)
    assert set(data.trials["status"]) == {"ok"}
    assert {"train/loss", "val/acc"} <= set(data.history["key"])
    # analysis.load_sweep's defaults follow it too (they read ./mlruns whatever it said).
    from batchscope.analysis import load_sweep

    assert len(load_sweep(STUDY).trials) == 2
    # root= names the folder for one call, whatever the variable says.
    monkeypatch.setenv("BATCHSCOPE_ROOT", str(tmp_path / "elsewhere"))
    assert len(batchscope.load(STUDY, root=walkthrough.store).trials) == 2


def test_a_missing_study_is_one_line_without_batchscopes_frames(walkthrough: Walkthrough) -> None:
    with pytest.raises(batchscope.UserError) as info:
        batchscope.load("no-such-study", root=walkthrough.store)
    message = str(info.value)
    assert "no-such-study" in message and "\n" not in message
    frames = traceback.extract_tb(info.value.__traceback__)
    assert not [f.filename for f in frames if "/sweeps/" in f.filename or "/analysis/" in f.filename]
    with pytest.raises(batchscope.UserError, match="no sweep has run here yet"):
        batchscope.load(STUDY, root=walkthrough.tmp / "empty")


def test_a_bad_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with pytest.raises(batchscope.UserError, match=r"no config key 'train\.max_step'"):
        batchscope.sweep(small_config("bad"), overrides={"train.max_step": 5}, root=root)
    with pytest.raises(batchscope.UserError, match=r"no config key 'train\.max_step'"):
        batchscope.sweep(write_config(tmp_path / "bad.yaml", small_config("bad")), overrides=["train.max_step=5"])
    with pytest.raises(batchscope.UserError, match="does not exist"):
        batchscope.sweep(tmp_path / "missing.yaml", root=root)
    with pytest.raises(ValueError, match="workers must be from 1"):
        batchscope.sweep(small_config("bad"), workers=0, root=root)
    with pytest.raises(ValueError, match="n_trials must be from 1"):
        batchscope.sweep(small_config("bad"), n_trials=0, root=root)
    assert not root.exists()  # nothing was opened


def test_a_recipe_defined_in_the_callers_script_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers never run the caller's script, so what it defines cannot be found there."""

    def build(model: str, options: dict, device: torch.device) -> None:
        raise AssertionError("never built")

    monkeypatch.setattr(sys.modules["__main__"], "build", build, raising=False)  # as a script's own def
    with pytest.raises(batchscope.UserError, match="put the recipe in a module"):
        batchscope.sweep(small_config("bad"), overrides={"trainer.recipe": "__main__:build"}, root=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_overrides_are_read_as_the_command_lines_set_reads_them() -> None:
    from batchscope._common import read_config

    overrides = {"train.max_steps": 7, "search.lr": {"values": [0.1, 1e-5]}, "study": "123", "train.target": None}
    cfg = read_config(small_config("o"), overrides)
    assert (cfg.train.max_steps, cfg.search.lr_choices(), cfg.study, cfg.train.target) == (7, [0.1, 1e-5], "123", None)
    assert read_config(small_config("o"), ["train.max_steps=7"]).train.max_steps == 7
    with pytest.raises(ValueError, match="overrides must be a mapping"):
        read_config(small_config("o"), [("train.max_steps", 7)])  # type: ignore[list-item]


def test_report_names_its_own_argument(walkthrough: Walkthrough) -> None:
    with pytest.raises(batchscope.UserError, match=r"out_dir .* is a file, not a folder"):
        batchscope.report(STUDY, walkthrough.store, out_dir=walkthrough.store / "mlflow.db")


def test_autobatch_refuses_a_bad_fraction_in_one_line() -> None:
    with pytest.raises(batchscope.UserError, match=r"fraction must be in \(0, 1\], got fraction=2"):
        batchscope.autobatch(small_config("ab"), fraction=2)


def test_noise_scale_defaults_fit_a_small_dataset() -> None:
    torch.manual_seed(0)
    x = torch.randn(100, 4)
    y = x @ torch.randn(4, 1) + torch.randn(100, 1)
    model = torch.nn.Linear(4, 1)
    # b_big defaults to 512 but at most the dataset, b_small to b_big / 8 (as the CLI's).
    est = batchscope.noise_scale(model, torch.nn.functional.mse_loss, x, y, n_batches=4)
    assert (est.b_small, est.b_big, est.n_batches) == (12, 100, 4)
    with pytest.raises(ValueError, match="b_big must not exceed the 100 examples"):
        batchscope.noise_scale(model, torch.nn.functional.mse_loss, x, y, b_big=512)


def test_noise_scale_command_takes_an_mlflow_run_id(
    walkthrough: Walkthrough, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `throughput --checkpoint` does: a run id's weights/model.pt is fetched and loaded."""
    from mlflow import MlflowClient

    from batchscope.sweeps.cli import main
    from batchscope.trainers.recipes import build_task

    monkeypatch.setenv("BATCHSCOPE_ROOT", str(walkthrough.store))
    cfg = small_config(STUDY)  # the walk-through's model: an MLP on 1200 MNIST-1D examples
    task = build_task(cfg["trainer"]["recipe"], cfg["trainer"]["model"], {"num_samples": 1200}, torch.device("cpu"))
    torch.save(task.model.state_dict(), tmp_path / "model.pt")
    client = MlflowClient(f"sqlite:///{walkthrough.store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    run_id = client.create_run(experiment.experiment_id).info.run_id
    client.log_artifact(run_id, str(tmp_path / "model.pt"), artifact_path="weights")
    config = str(write_config(tmp_path / "n.yaml", cfg))

    assert main(["noise-scale", config, "--checkpoint", run_id, "--b-big", "64", "--batches", "4"]) == 0
    assert f"the weights of MLflow run {run_id}" in capsys.readouterr().out
    assert main(["noise-scale", config, "--checkpoint", "0" * 32, "--batches", "4"]) == 2
    assert "neither a file nor an MLflow run" in capsys.readouterr().err


def test_import_batchscope_loads_no_heavy_library() -> None:
    code = "import batchscope, sys; print([m for m in ('torch', 'optuna', 'mlflow', 'pandas') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
    assert callable(batchscope.sweep) and "sweep" in dir(batchscope)
    with pytest.raises(AttributeError, match="no attribute 'sweeps_'"):
        batchscope.sweeps_  # noqa: B018

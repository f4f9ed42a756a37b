"""`search.params` and `train.optimizer`: more hyperparameters searched with the batch size, a
user's optimizer, the batch-size couplings; checked on real sweeps, read back from both stores."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from batchscope.sweeps.cli import main
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config
from tests.sweeps_tests.test_config_errors import _refused_in_one_line


def _with(search_params: dict | None = None, optimizer: object = None, **train: object) -> dict:
    cfg = small_config("p")
    if search_params is not None:
        cfg["search"]["params"] = search_params
    if optimizer is not None:
        cfg["train"]["optimizer"] = optimizer
    cfg["train"].update(train)
    return cfg


BAD = [
    (
        "unknown name",
        _with({"wd": {"low": 0.0, "high": 0.1}}),
        ["search.params.wd", "not a setting of sgd", "weight_decay"],
    ),
    (
        "low above high",
        _with({"weight_decay": {"low": 0.1, "high": 0.01}}),
        ["search.params.weight_decay", "low must be < high"],
    ),
    ("log from zero", _with({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}), ["log: true needs low > 0"]),
    (
        "no rule",
        _with({"warmup_steps": {"values": [0, 10], "scale_with_batch": True}}),
        ["warmup_steps.scale_with_batch", "no batch-size rule"],
    ),
    ("whole number", _with({"warmup_steps": {"low": 0.5, "high": 10.0}}), ["warmup_steps is a whole number"]),
    ("decimal", _with({"momentum": {"low": 0, "high": 1}}), ["momentum is a decimal"]),
    ("out of range", _with({"momentum": {"values": [0.5, 1.5]}}), ["search.params.momentum", "in [0, 1)", "1.5"]),
    (
        "searched twice",
        _with({"weight_decay": {"values": [0.0, 0.1]}}, weight_decay=0.1),
        ["also fixed as train.weight_decay"],
    ),
    ("reserved", _with({"seed": {"values": [1, 2]}}), ["search.params.seed", "set elsewhere"]),
    ("bad recipe value", _with({"hidden": {"values": [16, 0]}}), ["search.params.hidden", "0", "recipe option hidden"]),
    ("unknown optimizer", _with(optimizer="lion"), ["train.optimizer", "unknown optimizer 'lion'"]),
    ("bad setting", _with(optimizer={"adamw": {"betas": [0.9, 1.2]}}), ["train.optimizer.beta2", "in [0, 1)"]),
    ("setting of another", _with(optimizer={"adamw": {"nesterov": True}}), ["adamw has no setting 'nesterov'"]),
    ("factory missing", _with(optimizer="no_such_module_xyz:make"), ["cannot import 'no_such_module_xyz'"]),
    (
        "train.momentum with a setting",
        _with(optimizer={"sgd": {"momentum": 0.5}}, momentum=0.8),
        ["train.momentum", "one place"],
    ),
]


@pytest.mark.parametrize(("name", "cfg", "fragments"), BAD, ids=[c[0] for c in BAD])
def test_a_bad_declaration_is_one_clear_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], name: str, cfg: dict, fragments: list[str]
) -> None:
    path = write_config(workdir / "bad.yaml", cfg)
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _study(workdir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(workdir / "mlruns" / "optuna.journal"))


def _runs(workdir: Path, name: str) -> dict[int, dict[str, str]]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return {
        int(r.data.tags["optuna.trial_number"]): r.data.params
        for r in runs
        if r.data.tags.get("batchscope.role") == "trial"
    }


def test_a_grid_over_two_extra_dimensions_trains_every_point_logs_it_and_reports_it(workdir: Path) -> None:
    cfg = small_config("grid2")
    cfg["train"].update({"max_steps": 20, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"].update(
        {
            "sampler": "grid",
            "batch_size": {"values": [16, 64]},
            "lr": {"values": [0.05]},
            "n_trials": 8,
            "params": {
                # Scaled from the reference batch (128) to keep B/(η·λ) constant: ×B/128 without lr scaling.
                "weight_decay": {"low": 1e-4, "high": 1e-2, "log": True, "grid_points": 2, "scale_with_batch": True},
                "warmup_steps": {"values": [0, 5]},
            },
        }
    )
    assert main(["sweep", str(write_config(workdir / "g.yaml", cfg))]) == 0
    study = _study(workdir, "grid2")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    points = {(t.params["batch_size"], t.params["weight_decay"], t.params["warmup_steps"]) for t in done}
    assert points == {(b, wd, w) for b in (16, 64) for wd in (1e-4, 1e-2) for w in (0, 5)}
    runs = _runs(workdir, "grid2")
    for t in done:
        params = runs[t.number]
        # The sampled values are the run's params; the one the optimizer used is the trainer's effective_*.
        assert float(params["weight_decay"]) == pytest.approx(t.params["weight_decay"])
        assert int(params["warmup_steps"]) == t.params["warmup_steps"]
        expected = t.params["weight_decay"] * t.params["batch_size"] / 128
        assert float(params["effective_weight_decay"]) == pytest.approx(expected, rel=1e-9)

    # The report: its chart of the best value per batch size holds Optuna's best trial of each batch size.
    from batchscope.analysis import load_sweep
    from batchscope.analysis.analyze import analyze
    from batchscope.analysis.charts_params import best_values, trial_values

    sweep = load_sweep("grid2")
    result = analyze(sweep)
    best = best_values(result, trial_values(sweep)).set_index("batch_size")
    for batch in (16, 64):
        at_b = [t for t in done if t.params["batch_size"] == batch]
        theirs = min(at_b, key=lambda t: (t.value, t.number))
        assert best.loc[batch, "trial"] == theirs.number
        assert best.loc[batch, "weight_decay"] == pytest.approx(theirs.params["weight_decay"])
        assert best.loc[batch, "warmup_steps"] == theirs.params["warmup_steps"]
    html = (workdir / "reports" / "grid2" / "index.html").read_text()
    assert "Other searched hyperparameters" in html and "chart &#x27;params&#x27; failed" not in html
    assert (workdir / "reports" / "grid2" / "charts" / "params.png").stat().st_size > 10_000


@pytest.mark.parametrize("sampler", ["tpe", "random", "frontier"])
def test_every_sampler_samples_the_extra_dimensions_within_their_bounds(workdir: Path, sampler: str) -> None:
    cfg = small_config(f"s-{sampler}")
    cfg["train"].update({"max_steps": 20, "eval_every": 10, "sharpness": {"enabled": False}, "optimizer": "adamw"})
    cfg["search"].update(
        {
            "sampler": sampler,
            "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "n_trials": 4,
            "params": {"beta2": {"low": 0.9, "high": 0.999}, "hidden": {"values": [16, 32]}},
        }
    )
    if sampler == "frontier":
        cfg["search"]["objective"] = "steps_to_target"
    assert main(["sweep", str(write_config(workdir / "s.yaml", cfg)), "--no-report"]) == 0
    trials = _study(workdir, f"s-{sampler}").get_trials()
    assert len(trials) == 4
    runs = _runs(workdir, f"s-{sampler}")
    for t in trials:
        assert 0.9 <= t.params["beta2"] <= 0.999 and t.params["hidden"] in (16, 32)
        assert float(runs[t.number]["beta2"]) == pytest.approx(t.params["beta2"])
        # A recipe option searched: the run's model was built with it (its data description names it).
        assert f"hidden={t.params['hidden']}" in runs[t.number]["dataset"]


USER_OPTIM = textwrap.dedent(
    """
    import torch

    def make(params, lr, weight_decay=0.0, betas=(0.9, 0.999)):
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    """
)


def _user_optim(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/recipes.md's factory (norms and biases kept out of weight decay), in a module of the user's own."""
    (workdir / "user_optim.py").write_text(USER_OPTIM)
    monkeypatch.syspath_prepend(str(workdir))
    import os

    # The trial workers import it too (as `PYTHONPATH=.` in the docs).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(workdir), os.environ.get("PYTHONPATH")])))


def test_a_users_optimizer_factory_is_swept_over_weight_decay(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _user_optim(workdir, monkeypatch)
    cfg = small_config("factory")
    cfg["train"].update(
        {
            "max_steps": 30,
            "eval_every": 10,
            "sharpness": {"enabled": False},
            "optimizer": {"user_optim:make": {"betas": [0.9, 0.95]}},
        }
    )
    cfg["search"].update(
        {"lr": {"low": 1e-3, "high": 1e-2}, "n_trials": 3, "params": {"weight_decay": {"values": [0.0, 0.1]}}}
    )
    assert main(["sweep", str(write_config(workdir / "f.yaml", cfg)), "--no-report"]) == 0
    trials = _study(workdir, "factory").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    runs = _runs(workdir, "factory")
    for t in trials:
        params = runs[t.number]
        assert params["optimizer"] == "user_optim:make"
        assert float(params["weight_decay"]) == t.params["weight_decay"]
        assert params["betas"] == "[0.9, 0.95]"
        assert math.isfinite(t.value)


def test_a_factory_that_cannot_take_a_searched_option_is_refused_before_any_trial(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / "narrow_optim.py").write_text(
        "import torch\n\ndef make(params, lr):\n    return torch.optim.SGD(params, lr)\n"
    )
    monkeypatch.syspath_prepend(str(workdir))
    cfg = _with({"weight_decay": {"values": [0.0, 0.1]}}, optimizer="narrow_optim:make")
    path = write_config(workdir / "n.yaml", cfg)
    err = _refused_in_one_line(workdir, capsys, ["sweep", str(path)])
    assert "narrow_optim:make" in err and "weight_decay" in err


def test_a_dataloader_model_with_its_own_optimizer_swept_over_batch_lr_and_weight_decay(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's 'done when': a DataLoader recipe (a Dataset of dict batches, its own step and
    metrics), a factory optimizer, batch size × lr × weight decay, every in-loop measurement, a report."""
    _user_optim(workdir, monkeypatch)
    cfg = {
        "study": "user-model",
        "trainer": {"recipe": "tests.trainers_tests.data_recipes:build", "model": "mlp", "form": "collate", "n": 256},
        "train": {
            "optimizer": "user_optim:make",
            "max_steps": 24,
            "eval_every": 8,
            "target": {"metric": "val/acc", "value": 0.5},
            "gns": {"every": 2},
        },
        "search": {
            "batch_size": {"values": [16, 64]},
            "lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "params": {"weight_decay": {"low": 1e-3, "high": 0.1, "log": True, "scale_with_batch": True}},
            "n_trials": 4,
            "sampler": "random",
            "objective": "steps_to_target",
        },
        "device": "cpu",
    }
    assert main(["sweep", str(write_config(workdir / "u.yaml", cfg))]) == 0
    trials = _study(workdir, "user-model").get_trials()
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = _runs(workdir, "user-model")
    for t in trials:
        params = runs[t.number]
        # lr_scaling none: the factory got λ · B/128 to keep B/(η·λ) at the reference's.
        expected = t.params["weight_decay"] * t.params["batch_size"] / 128
        assert float(params["effective_weight_decay"]) == pytest.approx(expected, rel=1e-9)
        run = client.search_runs(
            [client.get_experiment_by_name("user-model").experiment_id],  # type: ignore[union-attr]
            filter_string=f"tags.`optuna.trial_number` = '{t.number}'",
        )[0]
        # The in-loop measurements of any trial: loss windows, evaluations, the noise scale, speed, memory.
        # (gns/b_simple only where the window's mean |G|² is 3 standard errors above 0: not guaranteed here.)
        measured = {"train/loss", "val/acc", "gns/grad_sq", "gns/trace_sigma", "perf/samples_per_s", "mem/peak_mb"}
        assert measured <= set(run.data.metrics), measured - set(run.data.metrics)
        assert "final/sharpness" in run.data.metrics
    html = (workdir / "reports" / "user-model" / "index.html").read_text()
    assert "Other searched hyperparameters" in html

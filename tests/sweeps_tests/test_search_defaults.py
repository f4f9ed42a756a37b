"""The search's defaults: the val_loss / val_acc objectives and the pruners (see benchmarks/README.md, 4)."""

from __future__ import annotations

import optuna
import pytest

from sweeps import space
from sweeps.config import validate
from tests.conftest import small_config


def test_tail_means_average_the_last_evaluations() -> None:
    evals = [{"val/loss": 2.0, "val/acc": 0.1}, {"val/loss": 1.0, "val/acc": 0.5}, {"val/loss": 0.5, "val/acc": 0.7}]
    out = space.tail_means(evals, 2, {})
    assert out == {"final/tail_val_loss": pytest.approx(0.75), "final/tail_val_acc": pytest.approx(0.6)}
    # Fewer evaluations than the window: all of them.
    assert space.tail_means(evals, 10, {})["final/tail_val_acc"] == pytest.approx(1.3 / 3)


def test_tail_means_fall_back_to_the_final_evaluation() -> None:
    # No evaluation reached the sweep, or a regression recipe (no accuracy): the final values.
    out = space.tail_means([{"val/loss": 0.4}], 4, {"final/val_loss": 9.0, "final/val_acc": 0.8})
    assert out == {"final/tail_val_loss": pytest.approx(0.4), "final/tail_val_acc": pytest.approx(0.8)}
    assert space.tail_means([], 4, {}) == {}


def test_objectives_read_the_tail_means() -> None:
    cfg = validate(small_config(search__objective="val_acc"), "test")
    assert cfg.search.objective_evals == 4  # the default
    finals = [{"final/tail_val_acc": 0.5, "final/best_val_acc": 0.9}, {"final/tail_val_acc": 0.7}]
    assert space.objective_values(cfg.search, finals) == [pytest.approx(0.6)]


def test_objective_window_is_part_of_the_study_fingerprint() -> None:
    a = validate(small_config(), "test")
    b = validate(small_config(search__objective_evals=1), "test")
    assert space.fingerprint(a) != space.fingerprint(b)
    assert "objective_evals" in space.describe_difference(space.fingerprint(a), space.fingerprint(b))


def test_successive_halving_pruner_starts_at_one_evaluation() -> None:
    cfg = validate(small_config(search__pruner="successive_halving", train__eval_every=25), "test")
    pruner = space.make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    # The first trial sets the bar at the first rung (25 steps); one in the worst four fifths stops there.
    for value in (0.9, 0.8, 0.7, 0.6):
        trial = study.ask()
        trial.report(value, 25)
        if value == 0.9:
            assert not trial.should_prune()
    assert trial.should_prune()
    # Before the first rung nothing is pruned.
    early = study.ask()
    early.report(0.0, 10)
    assert not early.should_prune()

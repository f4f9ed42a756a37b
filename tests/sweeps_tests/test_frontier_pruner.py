"""FrontierPruner: a trial is judged only against the best at its batch size, by its steps to the target."""

from __future__ import annotations

import math
from typing import Literal

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from batchscope.sweeps import space
from batchscope.sweeps.config_load import validate
from batchscope.sweeps.frontier_pruner import FrontierPruner
from tests.conftest import small_config

DISTRIBUTIONS = {
    "batch_size": CategoricalDistribution([32, 64, 128]),
    "lr": FloatDistribution(1e-3, 1.0, log=True),
}
BEST_LR = 0.1
BEST_STEPS = 1000.0  # the best at batch size 64 reached the target (acc 0.6 / loss 0.5) in 1,000 steps


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def complete(batch: int, lr: float, steps: float) -> FrozenTrial:
    return optuna.trial.create_trial(
        params={"batch_size": batch, "lr": lr}, distributions=DISTRIBUTIONS, value=steps, state=TrialState.COMPLETE
    )


def running(batch: int, lr: float, curve: dict[int, float]) -> FrozenTrial:
    return optuna.trial.create_trial(
        params={"batch_size": batch, "lr": lr},
        distributions=DISTRIBUTIONS,
        intermediate_values=curve,
        state=TrialState.RUNNING,
    )


def study_with(*trials: FrozenTrial) -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    for t in trials:
        study.add_trial(t)
    return study


def accuracy(slope: float, steps: range, start: float = 0.1) -> dict[int, float]:
    return {s: start + slope * s for s in steps}


STUDY = (complete(64, BEST_LR, BEST_STEPS), complete(64, 0.3, 1400.0), complete(64, 0.01, math.inf))
PRUNER = FrontierPruner(0.6, "maximize")


def test_a_slow_trial_is_pruned_once_its_optimistic_line_misses_the_best() -> None:
    # 0.0002 per step from 0.16 at step 300: 2,200 more steps to 0.6, past the best's 1,000.
    slow = running(64, 0.03, accuracy(2e-4, range(100, 301, 100)))
    assert PRUNER.prune(study_with(*STUDY), slow)


def test_a_trial_on_course_to_beat_the_best_goes_on() -> None:
    # 0.4 at step 300 at 0.001 per step: 200 more steps, 500 in all < 1,000.
    fast = running(64, 0.03, accuracy(1e-3, range(100, 301, 100)))
    assert not PRUNER.prune(study_with(*STUDY), fast)


def test_the_steepest_recent_slope_is_taken() -> None:
    # A noisy curve whose last step fell: the rise from 200 to 300 (0.002 per step) still counts,
    # from the best value so far (0.4): 100 more steps.
    noisy = running(64, 0.03, {100: 0.1, 200: 0.2, 300: 0.4, 400: 0.35})
    assert not PRUNER.prune(study_with(*STUDY), noisy)


def test_at_the_best_steps_without_the_target_a_trial_cannot_win() -> None:
    # Close to the target and rising fast, but at step 1,000 it has not reached it: its steps to
    # the target will exceed the best's, whatever the extrapolation says.
    late = running(64, 0.03, {900: 0.55, 1000: 0.59})
    assert PRUNER.prune(study_with(*STUDY), late)
    assert not PRUNER.prune(study_with(*STUDY), running(64, 0.03, {900: 0.55}))


def test_a_trial_that_reached_the_target_is_never_pruned() -> None:
    # Reached at 900 (training on past the target), then a noisy dip at 1,100: its steps to the
    # target are below the best's already.
    reached = running(64, 0.03, {300: 0.3, 600: 0.5, 900: 0.62, 1100: 0.58})
    assert not PRUNER.prune(study_with(*STUDY), reached)


def test_other_batch_sizes_do_not_judge_a_trial() -> None:
    slow = accuracy(2e-4, range(100, 301, 100))  # pruned at batch size 64 (first test)
    # No complete trial at 128: nothing to compare with.
    assert not PRUNER.prune(study_with(*STUDY), running(128, 0.03, slow))
    # The best at 128 took 5,000 steps: 2,500 steps at its line is a possible win.
    assert not PRUNER.prune(study_with(*STUDY, complete(128, 0.2, 5000.0)), running(128, 0.03, slow))
    # Batch size 32 took 800 steps: it does not make a 64's 900 steps lose.
    late_at_64 = running(64, 0.03, {700: 0.5, 800: 0.55, 900: 0.58})
    assert not PRUNER.prune(study_with(complete(64, BEST_LR, BEST_STEPS), complete(32, 0.1, 800.0)), late_at_64)


def test_a_high_lr_that_starts_slow_but_catches_up_is_not_pruned() -> None:
    # Above the best lr: flat for the first third of the best's steps, then fast to the target at 600.
    curve = {100: 0.1, 200: 0.1, 300: 0.11, 400: 0.3, 500: 0.45, 600: 0.62}
    steps = sorted(curve)
    for n in range(1, len(steps) + 1):
        prefix = {s: curve[s] for s in steps[:n]}
        assert not PRUNER.prune(study_with(*STUDY), running(64, 0.3, prefix)), f"pruned at step {steps[n - 1]}"
    # The same start at a learning rate below the best's is judged at once: no progress, pruned.
    assert PRUNER.prune(study_with(*STUDY), running(64, 0.03, {s: curve[s] for s in steps[:3]}))


def test_a_high_lr_is_judged_after_the_first_third() -> None:
    # Still flat past a third of the best's steps: pruned.
    flat = running(64, 0.3, {100: 0.1, 200: 0.1, 300: 0.11, 400: 0.11})
    assert PRUNER.prune(study_with(*STUDY), flat)


@pytest.mark.parametrize("evaluations", [1, 2])
def test_fewer_evaluations_than_the_minimum_are_not_extrapolated(evaluations: int) -> None:
    hopeless = running(64, 0.03, {s: 0.1 for s in range(100, 100 * evaluations + 1, 100)})
    assert not PRUNER.prune(study_with(*STUDY), hopeless)
    assert FrontierPruner(0.6, "maximize", min_evals=2).prune(
        study_with(*STUDY), running(64, 0.03, {100: 0.1, 200: 0.1})
    )


def test_without_a_complete_trial_at_the_batch_size_nothing_is_pruned() -> None:
    slow = running(64, 0.03, accuracy(2e-4, range(100, 301, 100)))
    # Only a trial that never reached the target, and a pruned one: no best yet.
    pruned = optuna.trial.create_trial(
        params={"batch_size": 64, "lr": 1.0}, distributions=DISTRIBUTIONS, state=TrialState.PRUNED
    )
    assert not PRUNER.prune(study_with(complete(64, 0.01, math.inf), pruned), slow)


def test_a_diverged_evaluation_ends_the_trial() -> None:
    assert PRUNER.prune(study_with(*STUDY), running(64, 0.3, {100: 0.1, 200: math.nan}))
    # With no best at its batch size either.
    assert FrontierPruner(0.5, "minimize").prune(study_with(), running(64, 0.3, {100: 2.0, 200: math.inf}))


@pytest.mark.parametrize(
    ("curve", "lr", "pruned"),
    [
        ({100: 2.0, 200: 1.9, 300: 1.8}, 0.03, True),  # 0.001 per step from 1.8: 1,600 steps in all
        ({100: 2.0, 200: 1.5, 300: 1.0}, 0.03, False),  # 0.005 per step from 1.0: 400 in all
        ({100: 2.0, 200: 2.0, 300: 2.1}, 0.3, False),  # a high lr in its first third
        ({900: 0.7, 1000: 0.6}, 0.03, True),  # at the best's steps above the target loss
        ({300: 1.0, 600: 0.4, 1100: 0.55}, 0.03, False),  # reached the target loss at 600
    ],
)
def test_a_loss_falls_to_its_target(curve: dict[int, float], lr: float, pruned: bool) -> None:
    pruner = FrontierPruner(0.5, "minimize")
    assert pruner.prune(study_with(*STUDY), running(64, lr, curve)) is pruned


def test_under_a_sample_budget_steps_are_read_back_from_examples() -> None:
    # The same curves as in steps, reported at step × batch size.
    pruner = FrontierPruner(0.6, "maximize", unit="samples")
    slow = accuracy(2e-4, range(100, 301, 100))
    fast = accuracy(1e-3, range(100, 301, 100))
    assert pruner.prune(study_with(*STUDY), running(64, 0.03, {s * 64: v for s, v in slow.items()}))
    assert not pruner.prune(study_with(*STUDY), running(64, 0.03, {s * 64: v for s, v in fast.items()}))


def test_it_prunes_through_optunas_report_and_should_prune() -> None:
    study = optuna.create_study(direction="minimize", pruner=FrontierPruner(0.6, "maximize"))
    for t in STUDY:
        study.add_trial(t)
    study.enqueue_trial({"batch_size": 64, "lr": 0.03})
    trial = study.ask(DISTRIBUTIONS)
    decisions = []
    for step, value in accuracy(2e-4, range(100, 501, 100)).items():
        trial.report(value, step)
        decisions.append(trial.should_prune())
    # Two evaluations are too few to judge; from the third on the line misses the best.
    assert decisions == [False, False, True, True, True]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": math.nan, "direction": "maximize"}, "target"),
        ({"target": 0.6, "direction": "up"}, "direction"),
        ({"target": 0.6, "direction": "maximize", "unit": "epochs"}, "unit"),
        ({"target": 0.6, "direction": "maximize", "min_evals": 1}, "min_evals"),
        ({"target": 0.6, "direction": "maximize", "window": 1}, "window"),
        ({"target": 0.6, "direction": "maximize", "high_lr_grace": 1.5}, "high_lr_grace"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrontierPruner(**kwargs)


# ---- make_pruner -------------------------------------------------------------------------------


def frontier_config(**overrides: object) -> dict:
    cfg = small_config(search__sampler="frontier", search__objective="steps_to_target")
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    return cfg


def test_the_frontier_sampler_gets_the_frontier_pruner_by_default() -> None:
    cfg = validate(frontier_config(), "test")
    assert cfg.search.pruner == "auto"
    pruner = space.make_pruner(cfg)
    assert isinstance(pruner, FrontierPruner)
    # It is given the target's metric, which it measures the distance to.
    assert space.pruning_metric(cfg) == "val/acc"


@pytest.mark.parametrize(
    "overrides",
    [
        {"search__pruner": "none"},  # the user's explicit none
        {"search__sampler": "tpe"},  # pruning stays off by default elsewhere
        {"search__objective": "val_acc"},  # no steps to compare
    ],
)
def test_otherwise_auto_means_no_pruning(overrides: dict) -> None:
    cfg = validate(frontier_config(**overrides), "test")
    assert isinstance(space.make_pruner(cfg), optuna.pruners.NopPruner)
    expected = "val/acc" if overrides.get("search__objective") == "val_acc" else None
    assert space.pruning_metric(cfg) == expected


def test_an_explicit_pruner_is_kept_under_frontier() -> None:
    cfg = validate(frontier_config(search__objective="val_acc", search__pruner="median"), "test")
    assert isinstance(space.make_pruner(cfg), optuna.pruners.MedianPruner)


def test_the_frontier_pruner_counts_examples_under_a_sample_budget() -> None:
    train = {"max_samples": 6000, "eval_every": 20, "target": {"metric": "val/loss", "value": 0.5}}
    cfg = validate(frontier_config() | {"train": train}, "test")
    pruner = space.make_pruner(cfg)
    assert isinstance(pruner, FrontierPruner)
    assert (pruner._unit, pruner._sign) == ("samples", -1.0)
    assert space.pruning_metric(cfg) == "val/loss"


def test_two_objectives_run_unpruned_by_default() -> None:
    cfg = validate(small_config(search__objective=["val_loss", "steps_to_target"]), "test")
    assert isinstance(space.make_pruner(cfg), optuna.pruners.NopPruner)
    assert space.pruning_metric(cfg) is None


@pytest.mark.parametrize(
    ("metric", "direction"),
    [("val/acc", "maximize"), ("val/loss", "minimize"), ("val/ppl", "minimize"), ("train/acc", "maximize")],
)
def test_target_direction_agrees_with_the_trainer(metric: str, direction: Literal["maximize", "minimize"]) -> None:
    from batchscope.trainers.evaluation import target_reached

    assert space.target_direction(metric) == direction
    # The trainer's rule: a value above the target reaches it exactly when the metric rises to it.
    assert target_reached(metric, 2.0, 1.0) is (direction == "maximize")


def test_with_several_seeds_a_first_seed_is_judged_against_the_best_first_seed() -> None:
    """The best's objective is its mean over seeds (336 steps: 372.5 and 299.4); the running trial
    reports its first seed only. At step 360 without the target it is behind that mean, but not
    behind the best's own first seed: it may still win (digits, batch 4, benchmarks 8b)."""
    best = complete(64, BEST_LR, 336.0)
    best.set_user_attr("first_seed_steps_to_target", 372.5)
    seed0 = running(64, 0.3, {120: 0.3, 240: 0.45, 360: 0.59})  # on course for about 368 steps
    assert not PRUNER.prune(study_with(best), seed0)
    # Without the record (plain Optuna, one value per trial) the value is the yardstick.
    assert PRUNER.prune(study_with(complete(64, BEST_LR, 336.0)), seed0)
    # Past the best's first seed without the target: it cannot win.
    assert PRUNER.prune(study_with(best), running(64, 0.3, {120: 0.3, 240: 0.45, 380: 0.58}))

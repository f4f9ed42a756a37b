"""The search's defaults: the val_loss / val_acc objectives and the pruners (see benchmarks/README.md, 4)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from batchscope.sweeps import space
from batchscope.sweeps.config_load import validate
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


def test_successive_halving_keeps_the_best_fifth_at_a_rung() -> None:
    cfg = validate(small_config(search__pruner="successive_halving", train__eval_every=25), "test")
    study = optuna.create_study(direction="maximize", pruner=space.make_pruner(cfg))

    def stops_at_first_rung(value: float) -> bool:
        trial = study.ask()
        trial.report(value, 25)
        return trial.should_prune()  # the pruner records each trial's value at the rung here

    assert not stops_at_first_rung(0.9)
    assert [stops_at_first_rung(v) for v in (0.5, 0.6, 0.7, 0.8, 0.7, 0.6)] == [True] * 6
    # Eight trials at the rung: the best fifth is one, so a second best stops...
    assert stops_at_first_rung(0.85)
    # ...and at ten it is two: a second best goes on, a third best does not.
    assert stops_at_first_rung(0.3)
    assert not stops_at_first_rung(0.88)
    assert stops_at_first_rung(0.86)


def _sample_budget(**train: object) -> dict:
    cfg = small_config(search__pruner="successive_halving", search__batch_size={"values": [16, 64, 256]})
    del cfg["train"]["max_steps"]
    cfg["train"].update({"eval_every": 20, **train})
    return cfg


def test_pruning_compares_trials_at_equal_steps_under_a_step_budget() -> None:
    cfg = validate(small_config(train__eval_every=20), "test")
    assert space.pruning_unit(cfg.train) == "steps"
    assert space.pruning_step(cfg.train, 40, 256) == 40


@pytest.mark.parametrize("budget", [{"max_samples": 20_000}, {"max_epochs": 3.0}])
def test_pruning_compares_trials_at_equal_examples_under_a_sample_or_epoch_budget(budget: dict) -> None:
    """A batch of 256 takes 16× fewer steps than one of 16: at equal steps it would have seen 16× more data."""
    cfg = validate(_sample_budget(**budget), "test")
    assert space.pruning_unit(cfg.train) == "samples"
    assert space.pruning_step(cfg.train, 40, 256) == 40 * 256
    study = optuna.create_study(direction="maximize", pruner=space.make_pruner(cfg, num_train=960))
    # The first rung is where the largest batch (256) is first evaluated: 20 steps × 256 = 5,120 examples.
    # Batch 256 reaches it at step 20 with 0.5, batch 16 at step 320 with 0.6: the early lead of the
    # large batch at step 20 (when batch 16 has seen 320 examples) does not count.
    big = study.ask()
    big.report(0.5, space.pruning_step(cfg.train, 20, 256))
    assert not big.should_prune()
    small = study.ask()
    small.report(0.05, space.pruning_step(cfg.train, 20, 16))  # 320 examples: before the first rung
    assert not small.should_prune()
    small.report(0.6, space.pruning_step(cfg.train, 320, 16))
    assert not small.should_prune()
    for _ in range(4):  # four more trials at the rung, all worse: they are not in the best fifth
        worse = study.ask()
        worse.report(0.4, 5_120)
    assert worse.should_prune()


def test_hyperband_budget_is_in_examples_under_a_sample_or_epoch_budget() -> None:
    def hyperband(cfg: dict, num_train: int | None = None) -> tuple[int, int]:
        cfg["search"]["pruner"] = "hyperband"
        pruner = space.make_pruner(validate(cfg, "test"), num_train=num_train)
        assert isinstance(pruner, optuna.pruners.HyperbandPruner)
        return pruner._min_resource, pruner._max_resource

    assert hyperband(_sample_budget(max_samples=50_000, eval_every=10)) == (10 * 256, 50_000)
    assert hyperband(_sample_budget(max_epochs=2.5, eval_every=10), num_train=9_600) == (10 * 256, 24_000)
    with pytest.raises(ValueError, match="num_train"):
        hyperband(_sample_budget(max_epochs=2.5, eval_every=10))
    # A step budget: one evaluation to the whole budget, in steps.
    assert hyperband(small_config(train__eval_every=10)) == (10, 60)


def test_a_sweep_under_a_sample_budget_reports_to_optuna_at_examples_seen(workdir: Path) -> None:
    from batchscope.sweeps.progress import QuietReporter
    from batchscope.sweeps.runner import Sweep

    cfg = small_config("by-examples", search__pruner="successive_halving", search__n_trials=3)
    del cfg["train"]["max_steps"]
    cfg["train"].update({"max_samples": 640, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"]["batch_size"] = {"values": [16, 32]}
    sweep = Sweep(validate(cfg, "test"))
    sweep.run(None, QuietReporter())
    trials = sweep.study.get_trials()
    assert len(trials) == 3
    for t in trials:
        bs = t.params["batch_size"]
        # Optuna sees examples (10, 20… steps × the batch size); MLflow keeps the training steps.
        history = sweep.tracker.client.get_metric_history(t.user_attrs["mlflow_run_id"], "val/acc")
        steps = sorted(m.step for m in history if m.step > 0)  # 0: at initialization, not reported to Optuna
        assert steps[0] == 10 and all(s % 10 == 0 for s in steps), steps
        assert sorted(t.intermediate_values) == [s * bs for s in steps][: len(t.intermediate_values)], t
        assert sorted(t.intermediate_values)[0] == 10 * bs

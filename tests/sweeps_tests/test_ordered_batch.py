"""The batch size on an ordered axis: an int on a log scale, trained only at the configured values."""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState

from batchscope.sweeps import space
from batchscope.sweeps.cli import main
from batchscope.sweeps.config import SearchConfig
from batchscope.sweeps.config_load import validate
from batchscope.sweeps.ordered_batch import OrderedBatchSampler, suggest_batch_size
from batchscope.sweeps.store_setup import journal_storage
from tests.conftest import small_config, write_config

# Not evenly spaced in log B: a proposal snapped to powers of two, or a frontier searching the
# range's powers of two, would train 32 or 128.
BATCHES = [16, 48, 256]


def _study(workdir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(workdir / "mlruns" / "optuna.journal"))


def _fast(name: str, n_trials: int, **search: object) -> dict:
    cfg = small_config(name)
    cfg["train"].update({"max_steps": 30, "eval_every": 10, "sharpness": {"enabled": False}})
    cfg["search"].update({"batch_size": {"values": BATCHES}, "n_trials": n_trials, **search})
    return cfg


@pytest.mark.parametrize(
    "search",
    [
        {"sampler": "random"},
        {"sampler": "tpe"},  # 1 random startup trial, then 2 from TPE's model
        {"sampler": "grid"},
        {"sampler": "frontier", "objective": "steps_to_target"},
    ],
    ids=lambda s: s["sampler"],
)
def test_every_sampler_trains_only_configured_batch_sizes_on_an_int_axis(workdir: Path, search: dict) -> None:
    name = f"axis-{search['sampler']}"
    assert main(["sweep", str(write_config(workdir / "s.yaml", _fast(name, 3, **search))), "--no-report"]) == 0
    study = _study(workdir, name)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 3
    for t in trials:
        # What optuna-dashboard and optuna.visualization draw: an ordered log axis over the list's range.
        assert t.distributions["batch_size"] == IntDistribution(16, 256, log=True)
        assert type(t.params["batch_size"]) is int and t.params["batch_size"] in BATCHES
    assert study.best_params["batch_size"] in BATCHES  # the batch size itself, not an exponent
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`batchscope.role` = 'trial'")
    assert sorted(r.data.params["batch_size"] for r in runs) == sorted(str(t.params["batch_size"]) for t in trials)


def _draws(sampler: str, n: int) -> Counter[int]:
    """`n` batch sizes as the sweep draws them at random: from one study (random), or the first,
    startup trial of `n` studies seeded apart (TPE)."""
    search = SearchConfig.model_validate(
        {"batch_size": {"values": BATCHES}, "sampler": sampler, "n_trials": 30, "seed": 0}
    )
    counts: Counter[int] = Counter()
    studies = [optuna.create_study(sampler=space.make_sampler(search, 0))] if sampler == "random" else []
    for i in range(n):
        study = studies[0] if studies else optuna.create_study(sampler=space.make_sampler(search, i))
        trial = study.ask()
        counts[space.suggest(trial, search)["batch_size"]] += 1
        study.tell(trial, 0.0)
    return counts


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_draws_give_each_batch_size_a_third(sampler: str) -> None:
    """Uniform over the listed values, as a categorical was: a log-uniform draw snapped to the
    nearest value would give 16 and 256 a quarter each and 48 half (a chi-square near 500 here)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = 1200
    counts = _draws(sampler, n)
    assert set(counts) == set(BATCHES)
    chi_square = sum((counts[b] - n / 3) ** 2 / (n / 3) for b in BATCHES)
    # Two degrees of freedom: P(χ² > 18.4) = 1e-4 for a uniform draw.
    assert chi_square < 18.4, counts


def test_a_proposal_is_mapped_to_the_nearest_listed_value_in_log_batch_size() -> None:
    sampler = OrderedBatchSampler(optuna.samplers.RandomSampler(seed=0), BATCHES)
    # 27.7 is the geometric mean of 16 and 48, 110.9 that of 48 and 256.
    table = {1: 16, 16: 16, 27: 16, 28: 48, 47.6: 48, 48: 48, 110: 48, 111: 256, 5000: 256}
    assert {x: sampler.nearest(x) for x in table} == table
    with pytest.raises(ValueError, match="batch_size=nan"):
        sampler.nearest(float("nan"))


def test_a_sampler_not_wrapped_is_refused_before_a_batch_size_off_the_list_is_trained() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    with pytest.raises(ValueError, match=r"not one of the configured \[16, 48, 256\].*OrderedBatchSampler"):
        for _ in range(20):  # 3 of 241 integers are listed: a draw off the list comes within a few
            suggest_batch_size(study.ask(), BATCHES)


def test_a_study_an_earlier_version_created_with_a_categorical_resumes_and_finishes(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Optuna refuses another distribution for `batch_size` in a study that holds a categorical:
    such a study keeps the categorical. Here an earlier version's sweep was killed mid-trial."""
    from batchscope.sweeps.runner import Sweep

    path = write_config(workdir / "old.yaml", _fast("old", 3))
    cfg = validate(_fast("old", 3), "test")
    sweep = Sweep(cfg)
    killed = sweep.study.ask()  # sampled as an earlier version did
    old = {
        "batch_size": killed.suggest_categorical("batch_size", BATCHES),
        "lr": killed.suggest_float("lr", 0.01, 0.5, log=True),
    }
    killed.set_user_attr("worker", f"{socket.gethostname()}:999999999")  # a process that does not exist

    assert main(["sweep", str(path), "--no-report"]) == 0
    trials = _study(workdir, "old").get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    assert trials[killed.number].state == TrialState.FAIL
    assert any(t.params == old for t in done)  # its re-run, with the same parameters
    for t in trials:
        assert t.distributions["batch_size"] == CategoricalDistribution(BATCHES)
    capsys.readouterr()
    assert main(["status", "old"]) == 0
    assert "COMPLETE" in capsys.readouterr().out


# ---- search.params' lists of numbers: the same ordered axes ------------------------------------


def _extra_draws(sampler: str, n: int) -> tuple[Counter[float], Counter[int], list[optuna.trial.FrozenTrial]]:
    """`n` draws of a float list, an int list with 0 (a linear axis) and a text list, from one study."""
    search = SearchConfig.model_validate(
        {
            "batch_size": {"values": BATCHES},
            "sampler": sampler,
            "n_trials": 30,
            "seed": 0,
            "params": {
                "beta2": {"values": [0.95, 0.99, 0.999]},
                "warmup_steps": {"values": [0, 100, 500]},
                "norm": {"values": ["batch", "group"]},
            },
        }
    )
    study = optuna.create_study(sampler=space.make_sampler(search, 0))
    betas: Counter[float] = Counter()
    warmups: Counter[int] = Counter()
    for _ in range(n):
        trial = study.ask()
        params = space.suggest(trial, search)
        betas[params["beta2"]] += 1
        warmups[params["warmup_steps"]] += 1
        study.tell(trial, 0.0)
    return betas, warmups, study.trials


@pytest.mark.parametrize("sampler", ["random", "frontier"])
def test_lists_of_numbers_in_search_params_are_ordered_axes_drawn_uniformly(sampler: str) -> None:
    """optuna-dashboard draws them in order, every draw is a listed value, and drawn at random
    each value gets a third (random; frontier samples search.params at random)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = 600
    betas, warmups, trials = _extra_draws(sampler, n)
    dists = trials[-1].distributions
    assert dists["beta2"] == optuna.distributions.FloatDistribution(0.95, 0.999, log=True)
    assert dists["warmup_steps"] == optuna.distributions.IntDistribution(0, 500, log=False)  # 0: linear
    assert isinstance(dists["norm"], optuna.distributions.CategoricalDistribution)  # text keeps no order
    assert set(betas) == {0.95, 0.99, 0.999} and set(warmups) == {0, 100, 500}
    for counts in (betas, warmups):
        chi_square = sum((c - n / 3) ** 2 / (n / 3) for c in counts.values())
        assert chi_square < 18.4, counts  # P(χ² > 18.4) = 1e-4 with 2 degrees of freedom

"""Batch size on an ordered axis: sampled as an integer on a log scale, trained only at the listed values.

A categorical of numbers has no order: optuna-dashboard merges a study's categorical choices
through a set and draws them as labels (1024, 128, 16, 256…), optuna.visualization draws them
as labels too, and TPE models a categorical without any order, so what it learns at 128 says
nothing about 256. `batch_size` is therefore suggested as `IntDistribution(min, max, log=True)`
over the configured values: both tools draw it on a log axis in order, and TPE models it in
log B (its Parzen estimators work in the log of a log-scaled int).

Only the configured values are ever trained (a list of powers of two is what the analysis
compares, and each value's memory fit was checked): `OrderedBatchSampler` wraps the configured
sampler and maps its batch-size proposal onto the nearest listed value in log B. The value
stays the batch size itself, so `trial.params["batch_size"]`, `study.best_params` and MLflow's
params read 256, not an exponent or an index.

Random draws are not snapped but made by the wrapper: a log-uniform draw on [16, 1024] snapped
to the nearest of 16, 32, …, 1024 gives the two end values half the weight of the others (half
of each end's interval lies outside the range), and a list unevenly spaced in log B would be
weighted by its gaps. Where the inner sampler draws at random (RandomSampler always, TPE during
its startup trials), the wrapper draws uniformly over the listed values, as a categorical did.

A study created by an earlier version holds a CategoricalDistribution for `batch_size`, and
Optuna refuses another kind of distribution for the same name in one study: `suggest_batch_size`
keeps suggesting the categorical there, so such a study resumes and finishes as before.

The same holds for the numeric `values` lists of `search.params` (beta2 in 0.95, 0.99, 0.999;
warmup_steps in 0, 100, 500): each is suggested on its own ordered axis (`suggest_ordered`, log
when every value is positive, else linear) and mapped onto its values by the same wrapper.
Lists of text or of true/false stay categoricals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "BATCH_PARAM",
    "OrderedBatchSampler",
    "batch_distribution",
    "is_ordered",
    "ordered_distribution",
    "suggest_batch_size",
    "suggest_ordered",
]

BATCH_PARAM = "batch_size"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what TPE counts towards its startup trials
Number = int | float


def is_ordered(values: Sequence[Any]) -> bool:
    """Whether a list of choices goes on an ordered axis: numbers only (not true/false)."""
    return bool(values) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def ordered_distribution(values: Sequence[Number]) -> IntDistribution | FloatDistribution:
    """The distribution a list of numbers is suggested from: its range, log-scaled when every
    value is positive; an int when every value is one."""
    numbers = _sorted_numbers(values)
    low, high, log = numbers[0], numbers[-1], numbers[0] > 0
    if all(isinstance(v, int) for v in numbers):
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


def batch_distribution(batch_sizes: Sequence[int]) -> IntDistribution:
    """The distribution `batch_size` is suggested from: the listed values' range, log-scaled."""
    values = _checked(batch_sizes)
    return IntDistribution(values[0], values[-1], log=True)


def suggest_batch_size(trial: optuna.trial.BaseTrial, batch_sizes: Sequence[int]) -> int:
    """Suggest `batch_size` from `batch_sizes` on an ordered axis (see the module docstring).

    In a study whose trials already hold a categorical batch size (created by an earlier
    version), the categorical is suggested as before. A value outside the list means the study's
    sampler was not wrapped in `OrderedBatchSampler` (as `make_sampler` does): refused before
    anything is trained.
    """
    return int(suggest_ordered(trial, BATCH_PARAM, _checked(batch_sizes)))


def suggest_ordered(trial: optuna.trial.BaseTrial, name: str, values: Sequence[Number]) -> Number:
    """Suggest `name` from the numbers `values` on an ordered axis (`ordered_distribution`),
    or as the categorical an earlier trial of the study holds it as."""
    numbers = _sorted_numbers(values)
    if isinstance(_earlier_distribution(trial, name), CategoricalDistribution):
        return trial.suggest_categorical(name, numbers)
    distribution = ordered_distribution(numbers)
    if isinstance(distribution, IntDistribution):
        value: Number = trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    else:
        value = trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    if value not in numbers:
        raise ValueError(
            f"{name} {value} is not one of the configured {numbers}: the study's sampler must be "
            "wrapped in OrderedBatchSampler (batchscope.sweeps.space.make_sampler does it)"
        )
    return value


def _earlier_distribution(trial: optuna.trial.BaseTrial, name: str) -> BaseDistribution | None:
    """`name`'s distribution in the study's first trial that has it (None in a new study)."""
    study = getattr(trial, "study", None)
    trials: Sequence[Any] = study.get_trials(deepcopy=False) if study is not None else [trial]
    for t in trials:
        if (dist := t.distributions.get(name)) is not None:
            return dist
    return None


def _checked(batch_sizes: Sequence[int]) -> list[int]:
    values = sorted({int(b) for b in batch_sizes})
    if not values or values[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, but got {list(batch_sizes)}.")
    return values


def _sorted_numbers(values: Sequence[Number]) -> list[Number]:
    if not is_ordered(values):
        raise ValueError(f"an ordered axis needs numbers, but got {list(values)}.")
    # A list mixing 0 and 0.1 is a list of decimals: one type, as the distribution has.
    numbers: list[Number] = list(values) if all(isinstance(v, int) for v in values) else [float(v) for v in values]
    return sorted(set(numbers))


@dataclass(frozen=True)
class _Axis:
    """One parameter on an ordered axis: its values, the distribution it is suggested from, and
    for how many finished trials its draws are uniform over the values (the inner sampler's random phase)."""

    values: list[Number]
    distribution: IntDistribution | FloatDistribution
    random_trials: float

    def nearest(self, name: str, value: float) -> Number:
        number = float(value)
        if not math.isfinite(number) or (self.distribution.log and number <= 0):
            raise ValueError(f"the inner sampler proposed {name}={value!r}, not a number on its axis.")
        if self.distribution.log:
            gaps = np.abs(np.log(np.asarray(self.values, dtype=float)) - math.log(number))
        else:
            gaps = np.abs(np.asarray(self.values, dtype=float) - number)
        return self.values[int(np.argmin(gaps))]


class OrderedBatchSampler(optuna.samplers.BaseSampler):
    """Wraps `inner` so that `batch_size`, an int on a log scale, only takes the listed values, and
    so do the numeric lists of `others` (name → values, `search.params`).

    The inner sampler's proposal (relative or independent) is mapped to the nearest listed value
    (in log space on a log axis); while the inner sampler would draw at random (its first
    `random_trials` finished trials; `others_random` for the others), the value is drawn
    uniformly over the list instead. Every other parameter, and a parameter of another
    distribution (a categorical in an older study), is the inner sampler's alone.

    Args:
        inner: the sampler that searches (TPE, random, grid, frontier).
        batch_sizes: the configured batch sizes.
        random_trials: finished (complete or pruned) trials during which `inner` samples at
            random: TPE's `n_startup_trials`; `math.inf` for RandomSampler; 0 for samplers
            whose proposals are already listed values (grid, frontier).
        seed: the seed of the wrapper's own uniform draws.
        others: more parameters on ordered axes, each with its list of numbers.
        others_random: as `random_trials`, for `others` (frontier draws them at random: inf).
    """

    def __init__(
        self,
        inner: optuna.samplers.BaseSampler,
        batch_sizes: Sequence[int],
        *,
        random_trials: float = 0,
        seed: int | None = None,
        others: Mapping[str, Sequence[Number]] | None = None,
        others_random: float | None = None,
    ) -> None:
        if not random_trials >= 0:
            raise ValueError(f"random_trials must be at least 0, but got {random_trials=}.")
        self.inner = inner
        self.batch_sizes = _checked(batch_sizes)
        self.distribution = batch_distribution(self.batch_sizes)
        self._axes = {BATCH_PARAM: _Axis(list(self.batch_sizes), self.distribution, random_trials)}
        rest = random_trials if others_random is None else others_random
        for name, values in (others or {}).items():
            numbers = _sorted_numbers(values)
            self._axes[name] = _Axis(numbers, ordered_distribution(numbers), rest)
        # A stream of its own: RandomSampler(seed) draws lr from RandomState(seed), and the same
        # stream for the batch size would tie each trial's batch size to its lr.
        self._rng = np.random.default_rng(None if seed is None else [seed, 0xBA7C])

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self.inner.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        params = self.inner.sample_relative(study, trial, search_space)
        for name, axis in self._axes.items():
            if name in params and search_space.get(name) == axis.distribution:
                params[name] = axis.nearest(name, params[name])
        return params

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        axis = self._axes.get(param_name)
        if axis is None or param_distribution != axis.distribution:
            return self.inner.sample_independent(study, trial, param_name, param_distribution)
        if axis.random_trials and len(study.get_trials(deepcopy=False, states=_FINISHED)) < axis.random_trials:
            return axis.values[int(self._rng.integers(len(axis.values)))]
        return axis.nearest(param_name, self.inner.sample_independent(study, trial, param_name, param_distribution))

    def nearest(self, value: float) -> int:
        """The listed batch size nearest `value` in log B (the smaller one on a tie)."""
        return int(self._axes[BATCH_PARAM].nearest(BATCH_PARAM, value))

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

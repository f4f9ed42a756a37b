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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = ["BATCH_PARAM", "OrderedBatchSampler", "batch_distribution", "suggest_batch_size"]

BATCH_PARAM = "batch_size"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what TPE counts towards its startup trials


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
    values = _checked(batch_sizes)
    if isinstance(_earlier_distribution(trial), CategoricalDistribution):
        return int(trial.suggest_categorical(BATCH_PARAM, values))
    value = trial.suggest_int(BATCH_PARAM, values[0], values[-1], log=True)
    if value not in values:
        raise ValueError(
            f"batch_size {value} is not one of the configured {values}: the study's sampler must be "
            "wrapped in OrderedBatchSampler (batchscope.sweeps.space.make_sampler does it)"
        )
    return value


def _earlier_distribution(trial: optuna.trial.BaseTrial) -> BaseDistribution | None:
    """The batch-size distribution of the study's first trial that has one (None in a new study)."""
    study = getattr(trial, "study", None)
    trials: Sequence[Any] = study.get_trials(deepcopy=False) if study is not None else [trial]
    for t in trials:
        if (dist := t.distributions.get(BATCH_PARAM)) is not None:
            return dist
    return None


def _checked(batch_sizes: Sequence[int]) -> list[int]:
    values = sorted({int(b) for b in batch_sizes})
    if not values or values[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, but got {list(batch_sizes)}.")
    return values


class OrderedBatchSampler(optuna.samplers.BaseSampler):
    """Wraps `inner` so that `batch_size`, an int on a log scale, only takes the listed values.

    The inner sampler's proposal (relative or independent) is mapped to the nearest listed value
    in log B; while the inner sampler would draw at random (its first `random_trials` finished
    trials), the batch size is drawn uniformly over the list instead. Every other parameter, and
    a `batch_size` of another distribution (a categorical in an older study), is the inner
    sampler's alone.

    Args:
        inner: the sampler that searches (TPE, random, grid, frontier).
        batch_sizes: the configured batch sizes.
        random_trials: finished (complete or pruned) trials during which `inner` samples at
            random: TPE's `n_startup_trials`; `math.inf` for RandomSampler; 0 for samplers
            whose proposals are already listed values (grid, frontier).
        seed: the seed of the wrapper's own uniform draws.
    """

    def __init__(
        self,
        inner: optuna.samplers.BaseSampler,
        batch_sizes: Sequence[int],
        *,
        random_trials: float = 0,
        seed: int | None = None,
    ) -> None:
        if not random_trials >= 0:
            raise ValueError(f"random_trials must be at least 0, but got {random_trials=}.")
        self.inner = inner
        self.batch_sizes = _checked(batch_sizes)
        self.distribution = batch_distribution(self.batch_sizes)
        self._random_trials = random_trials
        self._log_values = np.log(np.asarray(self.batch_sizes, dtype=float))
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
        if BATCH_PARAM in params and search_space.get(BATCH_PARAM) == self.distribution:
            params[BATCH_PARAM] = self.nearest(params[BATCH_PARAM])
        return params

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if param_name != BATCH_PARAM or param_distribution != self.distribution:
            return self.inner.sample_independent(study, trial, param_name, param_distribution)
        if self._random_trials and len(study.get_trials(deepcopy=False, states=_FINISHED)) < self._random_trials:
            return self.batch_sizes[int(self._rng.integers(len(self.batch_sizes)))]
        return self.nearest(self.inner.sample_independent(study, trial, param_name, param_distribution))

    def nearest(self, value: float) -> int:
        """The listed batch size nearest `value` in log B (the smaller one on a tie)."""
        number = float(value)
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"the inner sampler proposed batch_size={value!r}, not a positive number.")
        return self.batch_sizes[int(np.argmin(np.abs(self._log_values - math.log(number))))]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

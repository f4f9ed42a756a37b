"""`search.sampler: frontier`: every batch size's best learning rate, and the critical batch size.

A batch-size study asks for a frontier, not for one best configuration: steps to the target
against batch size mean something only when the learning rate is re-tuned at every batch size
(Shallue et al. 2019), and the best learning rate moves with batch size (McCandlish et al. 2018:
ε_opt(B) = ε_max / (1 + B_*/B)). FrontierSampler searches for that frontier:

- The learning rates form a grid in log lr: the listed values, or a log-spaced grid over a range
  with neighbours `lr_resolution` apart. Every proposal is a grid point no trial holds (done,
  running, or queued by another worker), so workers never repeat each other.
- A batch size not explored yet starts at the lr the law predicts from the others
  (`batchscope.analysis.fits.fit_lr_law` once three batch sizes have a best lr; before that a power law).
- At each batch size a one-dimensional search in log lr: step out, with steps that double,
  until the best lr has a worse trial on both sides (or the grid's edge); a diverged trial
  brackets from above. Then refine inside the bracket: the parabola's vertex through the best
  and its neighbours, or golden section on the wider side, until both neighbours on the grid
  are known, or until both neighbours are within the noise of the best (`frontier_line.noise_scale`:
  the residuals of a parabola in log lr through each line's best and its neighbours, pooled over
  batch sizes; the points between could not be told apart, and re-bracketing on noise would
  walk the whole line). A batch size where every trial misses the target, with misses on both
  sides of the lr the law predicts (3 at least), is unreachable in the budget: it is done, gets
  no more trials, and gives no point to B_crit.
- Batch sizes with an open side come first, then unexplored ones (the farthest in log B from
  those explored, so the law is fitted early across the range), then the widest bracket,
  weighted up near the critical batch size, whose interval these batch sizes decide.

Trials are read by state: COMPLETE with a value (not finite: the target was never reached, worse
than any finite value), PRUNED (worse than any finite value at that lr; a trial whose user attr
`status` is `"diverged"` also says its lr is too high), RUNNING or WAITING (pending: taken).
A proposal depends only on the study's trials, so it is deterministic; the seed only picks
points once the grid is used up.

Plain Optuna::

    import optuna
    from batchscope.sweeps.frontier import FrontierSampler, frontier_done

    def objective(trial):
        batch = trial.suggest_categorical("batch_size", [16, 32, 64, 128, 256, 512])
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        steps = train_until_target(batch, lr)  # your code; math.inf if never reached
        if steps is None:  # diverged
            trial.set_user_attr("status", "diverged")
            raise optuna.TrialPruned()
        return steps

    study = optuna.create_study(direction="minimize", sampler=FrontierSampler(seed=0))
    study.optimize(objective, n_trials=40, callbacks=[
        lambda study, _: frontier_done(study.get_trials(deepcopy=False), b_crit_rel_ci=0.25)[0] and study.stop()
    ])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from batchscope.analysis.fits import fit_critical_batch, fit_lr_law
from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps.frontier_line import DIVERGED, FINITE, PENDING, WORSE, Line, noise_scale

if TYPE_CHECKING:
    from batchscope.sweeps.config import SearchConfig

__all__ = ["FrontierSampler", "frontier_done", "stop_reason"]

_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Before the law can be fitted (3 batch sizes): lr ∝ B^0.5 from one batch size, between
# square-root (Adam) and linear (SGD) scaling; from two, their slope kept within [0, 1].
_PRIOR_SLOPE = 0.5
_MAX_BATCH_VALUES = 64  # an int batch range wider than this is searched at its powers of two


class FrontierSampler(optuna.samplers.BaseSampler):
    """Finds each batch size's best learning rate with few trials (see the module docstring).

    Args:
        seed: picks points at random only once every grid point is taken.
        batch_param, lr_param: the names the objective suggests.
        lr_resolution: neighbours' ratio on the grid over a continuous lr range (1.5: the best lr
            is known within a factor of 1.5).
        step: the first step out from a point, as an lr ratio (at least one grid step).
        batch_sizes: the batch sizes searched, where the batch-size distribution does not list
            them: an int range on a log scale (`batchscope.sweeps.ordered_batch`) holds every
            integer between its ends; without this list, its powers of two are searched.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        batch_param: str = "batch_size",
        lr_param: str = "lr",
        lr_resolution: float = 1.5,
        step: float = 2.0,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        if not (math.isfinite(lr_resolution) and lr_resolution > 1):
            raise ValueError(f"lr_resolution must be a finite ratio above 1, but got {lr_resolution=}.")
        if not (math.isfinite(step) and step > 1):
            raise ValueError(f"step must be a finite ratio above 1, but got {step=}.")
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._names = (batch_param, lr_param)
        self._resolution = lr_resolution
        self._step = step
        self._batch_sizes = None if batch_sizes is None else sorted(int(b) for b in batch_sizes)
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        self._raise_error_if_multi_objective(study)
        for t in reversed(study.get_trials(deepcopy=False)):
            if all(name in t.distributions for name in self._names):
                return {name: t.distributions[name] for name in self._names}
        return {}  # the first trial: sample_independent, one parameter at a time

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not all(name in search_space for name in self._names):
            return {}
        return self._propose(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if param_name not in self._names:
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        known = {
            **self.infer_relative_search_space(study, trial),
            **trial.distributions,
            param_name: param_distribution,
        }
        if all(name in known for name in self._names):
            return self._propose(study, trial, known)[param_name]
        # The batch size of the very first trials: the middle of the range, then outwards.
        batches = batch_values(param_distribution, self._batch_sizes)
        middle = np.mean(np.log(batches))
        order = sorted(range(len(batches)), key=lambda i: (abs(math.log(batches[i]) - middle), i))
        return _choice(param_distribution, batches[order[_rank(study, trial) % len(order)]])

    def _propose(
        self, study: optuna.Study, trial: FrozenTrial, dists: Mapping[str, BaseDistribution]
    ) -> dict[str, Any]:
        batch_dist, lr_dist = dists[self._names[0]], dists[self._names[1]]
        frontier = Frontier.from_trials(
            [t for t in study.get_trials(deepcopy=False, states=_STATES) if t.number != trial.number],
            batch_dist,
            lr_dist,
            minimize=study.direction == optuna.study.StudyDirection.MINIMIZE,
            names=self._names,
            lr_resolution=self._resolution,
            batch_sizes=self._batch_sizes,
        )
        fixed = trial.params.get(self._names[0])
        only = frontier.batch_index(fixed) if fixed is not None else None
        # Trials asked for at the same moment and not yet sampled take the next proposals in turn.
        pick: tuple[int, int] | None = None
        for _ in range(_rank(study, trial) + 1):
            pick = frontier.next_point(self._step, only=only)
            if pick is None:
                break
            frontier.lines[pick[0]].add(pick[1], PENDING, math.nan, None)
        if pick is None:
            pick = frontier.any_point(self._rng, only=only)
        b, i = pick
        return {
            self._names[0]: _choice(batch_dist, frontier.batch_sizes[b]),
            self._names[1]: _choice(lr_dist, frontier.lrs[i]),
        }


class Frontier:
    """The study seen as one Line (lr grid) per batch size."""

    def __init__(self, batch_sizes: Sequence[int], lrs: Sequence[float]) -> None:
        self.batch_sizes = list(batch_sizes)
        self.lrs = list(lrs)
        self.log_lrs = np.log(np.asarray(lrs, dtype=float))
        self.lines = [Line(self.log_lrs) for _ in batch_sizes]

    @classmethod
    def from_trials(
        cls,
        trials: Sequence[FrozenTrial],
        batch_dist: BaseDistribution,
        lr_dist: BaseDistribution,
        *,
        minimize: bool = True,
        names: tuple[str, str] = ("batch_size", "lr"),
        lr_resolution: float = 1.5,
        batch_sizes: Sequence[int] | None = None,
    ) -> Frontier:
        frontier = cls(batch_values(batch_dist, batch_sizes), lr_values(lr_dist, lr_resolution))
        for t in trials:
            params = t.params if all(n in t.params for n in names) else t.system_attrs.get("fixed_params", {})
            if not all(n in params for n in names):
                continue
            b = frontier.batch_index(params[names[0]])
            lr = float(params[names[1]])
            if b is None or not (math.isfinite(lr) and lr > 0):
                continue
            i = int(np.argmin(np.abs(frontier.log_lrs - math.log(lr))))
            if t.state == TrialState.COMPLETE:
                value = t.values[0] if t.values else math.nan
                loss = value if minimize else -value
                frontier.lines[b].add(i, FINITE if math.isfinite(loss) else WORSE, loss, t)
            elif t.state == TrialState.PRUNED:
                frontier.lines[b].add(
                    i, DIVERGED if t.user_attrs.get(attrs.STATUS) == "diverged" else WORSE, math.nan, t
                )
            else:
                frontier.lines[b].add(i, PENDING, math.nan, t)
        return frontier

    def batch_index(self, batch: Any) -> int | None:
        try:
            return self.batch_sizes.index(int(batch))
        except (TypeError, ValueError):
            return None

    def best_lrs(self) -> tuple[list[int], list[float]]:
        """(batch size, best lr) where the best is bracketed, or every best when fewer than 3 are."""
        bests = [(b, line.best()) for b, line in zip(self.batch_sizes, self.lines, strict=True)]
        found = [(b, i) for b, i in bests if i is not None]
        line_of = dict(zip(self.batch_sizes, self.lines, strict=True))
        bracketed = [(b, i) for b, i in found if line_of[b].bracketed()]
        use = bracketed if len(bracketed) >= 3 else found
        return [b for b, _ in use], [self.lrs[i] for _, i in use]

    def predicted_index(self, batch: int) -> int:
        """The grid point nearest the lr the others predict for this batch size."""
        known_b, known_lr = self.best_lrs()
        if not known_b:
            return len(self.lrs) // 2
        log_b, log_lr = np.log(known_b), np.log(known_lr)
        law = fit_lr_law(known_b, known_lr, n_bootstrap=1) if np.unique(log_b).size >= 3 else None
        if law is not None:
            predicted = math.log(float(law.predict([batch])[0]))
        elif np.unique(log_b).size == 2:
            slope = float(np.clip(np.polyfit(log_b, log_lr, 1)[0], 0.0, 1.0))
            near = int(np.argmin(np.abs(log_b - math.log(batch))))
            predicted = log_lr[near] + slope * (math.log(batch) - log_b[near])
        else:
            near = int(np.argmin(np.abs(log_b - math.log(batch))))
            predicted = log_lr[near] + _PRIOR_SLOPE * (math.log(batch) - log_b[near])
        return int(np.argmin(np.abs(self.log_lrs - predicted)))

    def _weights(self) -> np.ndarray:
        """Batch sizes near B_crit decide its interval: up to twice the weight there."""
        losses = [(b, line.best_loss()) for b, line in zip(self.batch_sizes, self.lines, strict=True)]
        points = [(b, s) for b, s in losses if s is not None and s > 0]
        fit = fit_critical_batch([b for b, _ in points], [s for _, s in points], n_bootstrap=1) if points else None
        if fit is None or fit.at_search_edge:
            return np.ones(len(self.batch_sizes))
        octaves = np.log2(np.asarray(self.batch_sizes, dtype=float) / fit.b_crit)
        return 1.0 + np.exp(-0.5 * (octaves / 1.5) ** 2)

    def stride(self, step: float) -> int:
        """The first step out, `step` as an lr ratio, in grid points (at least one)."""
        spacing = float(np.mean(np.diff(self.log_lrs))) if len(self.lrs) > 1 else 1.0
        return max(1, round(math.log(step) / spacing))

    def next_point(self, step: float, *, only: int | None = None) -> tuple[int, int] | None:
        """(batch index, lr index) of the most useful free point, or None if none is free."""
        stride = self.stride(step)
        noise = noise_scale(self.lines)
        explored = [k for k, line in enumerate(self.lines) if line.occupied().any()]
        log_b = np.log(np.asarray(self.batch_sizes, dtype=float))
        weights = self._weights()
        ranked: list[tuple[tuple[float, ...], int, int]] = []
        for k, line in enumerate(self.lines):
            if only is not None and k != only:
                continue
            if not line.occupied().any():
                # Farthest in log B from the explored ones; with none explored, the middle first.
                far = -min(abs(log_b[k] - log_b[j]) for j in explored) if explored else abs(log_b[k] - log_b.mean())
                ranked.append(((1.0, far, k), k, self.predicted_index(self.batch_sizes[k])))
                continue
            batch = self.batch_sizes[k]
            state, index = line.proposal(functools.partial(self.predicted_index, batch), stride, noise)
            if index is None:
                continue
            if state == "open":
                ranked.append(((0.0, -line.finished().sum(), k), k, index))
            else:
                ranked.append(((2.0, -line.width() * weights[k], k), k, index))
        if not ranked:
            return None
        _, k, index = min(ranked)
        return k, index

    def any_point(self, rng: np.random.Generator, *, only: int | None = None) -> tuple[int, int]:
        """Once every search is done: a free point nearest a batch size's best lr (one of them at
        random), or a random point once the whole grid is taken."""
        rows = [only] if only is not None else list(range(len(self.lines)))
        free = []
        for k in rows:
            best = self.lines[k].best()
            for i in np.flatnonzero(~self.lines[k].occupied()):
                free.append((abs(int(i) - best) if best is not None else len(self.lrs), k, int(i)))
        if free:
            nearest = min(d for d, _, _ in free)
            candidates = [(k, i) for d, k, i in free if d == nearest]
            return candidates[int(rng.integers(len(candidates)))]
        return int(rng.choice(rows)), int(rng.integers(len(self.lrs)))

    def unfinished(self, step: float = 2.0) -> list[int]:
        """Batch sizes whose best lr is not yet bracketed on both sides (nor their grid used up,
        nor found unreachable around the lr the others predict)."""
        stride = self.stride(step)
        return [
            b
            for b, line in zip(self.batch_sizes, self.lines, strict=True)
            if not line.resolved(self.predicted_index(b) if line.best() is None else None, stride)
        ]

    def unreachable(self, step: float = 2.0) -> list[int]:
        """Batch sizes done without a finite result: every trial missed the target around the
        predicted lr (or everywhere the grid allows)."""
        stride = self.stride(step)
        return [
            b
            for b, line in zip(self.batch_sizes, self.lines, strict=True)
            if line.best() is None and line.resolved(self.predicted_index(b), stride)
        ]


def batch_values(dist: BaseDistribution, listed: Sequence[int] | None = None) -> list[int]:
    """The batch sizes a distribution holds: the `listed` ones it contains if given, else a
    categorical's choices, an int range's values (its powers of two when it is log-scaled or
    wider than 64 values)."""
    if listed is not None:
        values = sorted(int(b) for b in listed if _holds(dist, int(b)))
    elif isinstance(dist, CategoricalDistribution):
        values = sorted(int(c) for c in dist.choices)  # type: ignore[arg-type]
    elif isinstance(dist, IntDistribution):
        values = list(range(dist.low, dist.high + 1, dist.step))
        if dist.log or len(values) > _MAX_BATCH_VALUES:
            powers = [2**p for p in range(64) if dist.low <= 2**p <= dist.high]
            values = powers or [dist.low, dist.high]
    else:
        raise ValueError(f"the batch size must be categorical or an int, but got {dist}")
    if not values or values[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, but got {values}")
    return values


def _holds(dist: BaseDistribution, batch: int) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return batch in dist.choices
    if isinstance(dist, IntDistribution):
        return dist.low <= batch <= dist.high and (batch - dist.low) % dist.step == 0
    raise ValueError(f"the batch size must be categorical or an int, but got {dist}")


def lr_values(dist: BaseDistribution, resolution: float = 1.5) -> list[float]:
    """The learning rates searched: a categorical's choices, or a log grid over a float range
    with neighbours `resolution` apart at most (its ends exactly the range's)."""
    if isinstance(dist, CategoricalDistribution):
        values = sorted(float(c) for c in dist.choices)  # type: ignore[arg-type]
    elif isinstance(dist, FloatDistribution):
        if dist.low <= 0:
            raise ValueError(f"a learning-rate range must be positive, but got {dist}")
        n = max(2, math.ceil(math.log(dist.high / dist.low) / math.log(resolution)) + 1)
        inner = np.exp(np.linspace(math.log(dist.low), math.log(dist.high), n))[1:-1]
        values = [dist.low, *(min(max(float(v), dist.low), dist.high) for v in inner), dist.high]
    else:
        raise ValueError(f"the learning rate must be categorical or a float, but got {dist}")
    if not values or values[0] <= 0:
        raise ValueError(f"learning rates must be positive, but got {values}")
    return values


def _choice(dist: BaseDistribution, value: float) -> Any:
    """The value as the distribution holds it (a categorical's own choice object)."""
    if isinstance(dist, CategoricalDistribution):
        return min(dist.choices, key=lambda c: abs(float(c) - value))  # type: ignore[arg-type]
    return int(value) if isinstance(dist, IntDistribution) else float(value)


def _rank(study: optuna.Study, trial: FrozenTrial) -> int:
    """How many earlier trials are running without their parameters yet (asked at the same time)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return sum(1 for t in running if t.number < trial.number and not t.params and "fixed_params" not in t.system_attrs)


def _space(trials: Sequence[FrozenTrial], names: tuple[str, str]) -> tuple[BaseDistribution, BaseDistribution] | None:
    for t in reversed(trials):
        if all(n in t.distributions for n in names):
            return t.distributions[names[0]], t.distributions[names[1]]
    return None


def frontier_done(
    trials: Sequence[FrozenTrial],
    *,
    b_crit_rel_ci: float,
    minimize: bool = True,
    steps: Callable[[FrozenTrial], float] | None = None,
    names: tuple[str, str] = ("batch_size", "lr"),
    lr_resolution: float = 1.5,
    step: float = 2.0,
    seed: int = 0,
    batch_sizes: Sequence[int] | None = None,
) -> tuple[bool, str]:
    """Whether the frontier is known: every batch size's best lr bracketed on both sides (or the
    batch size unreachable: `Line.unreachable`), and B_crit's 95% bootstrap interval
    (high − low)/B_crit at most `b_crit_rel_ci`; and why. `lr_resolution` and `step` as the
    sampler's, and `batch_sizes` (the batch sizes searched where the distribution does not list them).

    B_crit is fitted (`batchscope.analysis.fits.fit_critical_batch`) to the steps to target of each batch
    size's best trial: `steps(trial)`, by default the trial's value.
    """
    space = _space(trials, names)
    if space is None:
        return False, "no trial has sampled a batch size and a learning rate yet"
    finished = [t for t in trials if t.state in _FINISHED]
    frontier = Frontier.from_trials(
        finished, *space, minimize=minimize, names=names, lr_resolution=lr_resolution, batch_sizes=batch_sizes
    )
    open_batches = frontier.unfinished(step)
    if open_batches:
        return False, f"the best lr is not bracketed yet at batch size(s) {open_batches}"
    read = steps or (lambda t: t.values[0] if t.values else math.nan)
    points = [
        (b, read(t)) for b, line in zip(frontier.batch_sizes, frontier.lines, strict=True) if (t := line.best_trial)
    ]
    fit = fit_critical_batch([b for b, _ in points], [s for _, s in points], seed=seed)
    if fit is None:
        return False, "fewer than 3 batch sizes reached the target: B_crit cannot be fitted"
    rel = (fit.b_crit_high - fit.b_crit_low) / fit.b_crit
    missed = frontier.unreachable(step)
    said = (
        f"B_crit = {fit.b_crit:.3g} (95% interval {fit.b_crit_low:.3g}–{fit.b_crit_high:.3g}, "
        f"width {rel:.2f} of B_crit, asked ≤ {b_crit_rel_ci:g})"
        + (f"; target out of reach at batch size(s) {missed}" if missed else "")
    )
    if fit.at_search_edge:
        return False, f"{said}, but B_crit lies beyond the batch sizes searched"
    return rel <= b_crit_rel_ci, said


def stop_reason(study: optuna.Study, search: SearchConfig) -> str | None:
    """Why a frontier sweep with `search.stop_when` should ask for no more trials; None: go on."""
    if search.sampler != "frontier" or search.stop_when is None:
        return None
    by_value = search.objectives == ["steps_to_target"]

    def steps(t: FrozenTrial) -> float:
        if by_value and t.values:
            return float(t.values[0])
        return float(t.user_attrs.get("steps_to_target", math.nan))

    done, why = frontier_done(
        study.get_trials(deepcopy=False, states=_FINISHED),
        b_crit_rel_ci=search.stop_when.b_crit_rel_ci,
        minimize=study.direction == optuna.study.StudyDirection.MINIMIZE,
        steps=steps,
        batch_sizes=search.batch_choices(),
    )
    return f"frontier search done: {why}" if done else None

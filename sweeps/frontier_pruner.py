"""The pruner of `sampler: frontier`: stop a trial once it cannot reach the target faster than the
best trial at its own batch size.

The frontier asks, for each batch size, for the fewest steps to the target over learning rates.
A trial is therefore judged only against COMPLETE trials of its own batch size (their value is
their steps to the target), never against other batch sizes: a batch of 1,024 reaches the target
in far fewer steps than one of 16, and comparing across them would prune whole batch sizes.
At one batch size, equal steps are equal examples seen, so comparing at a step compares at equal
data under any budget (under a sample or epoch budget the reported step is in examples and is
divided back by the batch size).

The reported value is the target's metric (`val/acc` to rise to the target, `val/loss` or
`val/ppl` to fall to it). At an evaluation at step s, with B the best steps at the batch size:

1. A value that is not finite: the trial diverged; it ends at once.
2. The target already reached: never pruned (its steps to the target are at most s).
3. s ≥ B without the target: pruned. Steps to the target are interpolated between the
   evaluations around the crossing, so this trial's will exceed s ≥ B: it cannot win.
4. Otherwise only with `min_evals` evaluations, and for a learning rate above the best's, only
   past `high_lr_grace` of B: a high learning rate sits next to the divergence cliff and its
   early evaluations are noisy and behind (benchmark 4: the target region looks worse than its
   neighbours until the last third of training). Then its curve is extrapolated optimistically:
   from its best value so far, at the steepest rate of progress towards the target between
   successive evaluations among the last `window`, in a straight line. Training curves
   flatten, so a straight line at their steepest recent slope reaches the target no later than
   the curve does; if even that line needs more than B steps in all, the trial is pruned. A
   curve that made no progress over the window (no positive slope) is pruned too.

With several seeds per trial, only the first seed's curve is reported (the pruner stops a trial
before its other seeds run), while a trial's objective is the mean over its seeds: B is then the
best first-seed steps at the batch size (the `first_seed_steps_to_target` user attribute a
sweep records; the objective where it is absent, as in plain Optuna with one value per trial).
Compared with the mean, a seed-0 curve slower than the best's mean but faster than the best's
own seed 0 was pruned: on the digits recipe that cost batch 4 its best lr (benchmarks/README.md,
section 8b).

Rule 3 is a proof; rule 4 a conservative bet. A trial that is pruned is worse than the best at
its lr for FrontierSampler, which is what the line search needs to know.

Plain Optuna: report the target's metric at the training step, with `batch_size` and `lr` as
parameters and the steps to the target as the objective::

    study = optuna.create_study(
        direction="minimize", sampler=FrontierSampler(), pruner=FrontierPruner(0.6, "maximize")
    )
    # in the objective, at each evaluation:
    trial.report(val_acc, step)
    if trial.should_prune():
        raise optuna.TrialPruned()
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from batchscope.sweeps.optuna_attrs import FIRST_SEED_STEPS

__all__ = ["FrontierPruner"]


class FrontierPruner(optuna.pruners.BasePruner):
    """Prunes a trial that cannot reach `target` in fewer steps than the best at its batch size.

    Args:
        target: the value of the reported metric that counts as reached.
        direction: "maximize" if the metric rises to the target (accuracy), "minimize" if it
            falls to it (loss, perplexity).
        unit: what the reported steps count: training steps, or examples seen (step × batch size,
            as `batchscope.sweeps.space.pruning_step` reports under a sample or epoch budget).
        min_evals: evaluations before a curve is extrapolated (the proof of rule 3 needs none).
        window: the last this many evaluations give the extrapolation's slope.
        high_lr_grace: the share of the best's steps during which a learning rate above the best's
            is not extrapolated.
    """

    def __init__(
        self,
        target: float,
        direction: Literal["maximize", "minimize"],
        *,
        unit: Literal["steps", "samples"] = "steps",
        min_evals: int = 3,
        window: int = 4,
        high_lr_grace: float = 1 / 3,
    ) -> None:
        if not math.isfinite(target):
            raise ValueError(f"The target must be a finite number, but got {target=}.")
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"The direction must be 'maximize' or 'minimize', but got {direction=}.")
        if unit not in ("steps", "samples"):
            raise ValueError(f"The unit must be 'steps' or 'samples', but got {unit=}.")
        if min_evals < 2:
            raise ValueError(f"A slope needs two evaluations: min_evals must be at least 2, but got {min_evals=}.")
        if window < 2:
            raise ValueError(f"A slope needs two evaluations: window must be at least 2, but got {window=}.")
        if not 0.0 <= high_lr_grace <= 1.0:
            raise ValueError(f"high_lr_grace is a share of the best's steps in [0, 1], but got {high_lr_grace=}.")
        self._target = target
        # +1: progress is the metric rising; −1: falling. Every comparison is made on sign × value.
        self._sign = 1.0 if direction == "maximize" else -1.0
        self._unit = unit
        self._min_evals = min_evals
        self._window = window
        self._high_lr_grace = high_lr_grace

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        batch = trial.params.get("batch_size")
        per_step = batch if self._unit == "samples" and isinstance(batch, int | float) and batch > 0 else 1
        curve = sorted((s / per_step, v) for s, v in trial.intermediate_values.items() if s > 0)
        if not curve:
            return False
        steps, values = [s for s, _ in curve], [v for _, v in curve]
        if not math.isfinite(values[-1]):
            return True
        if any(self._sign * (v - self._target) >= 0 for v in values):
            return False
        best = self._best_at(study, batch)
        if best is None:
            return False
        best_steps, best_lr = best
        step = steps[-1]
        if step >= best_steps:
            return True
        if len(curve) < self._min_evals:
            return False
        lr = trial.params.get("lr")
        if lr is not None and best_lr is not None and lr > best_lr and step < self._high_lr_grace * best_steps:
            return False
        return step + self._steps_still_needed(steps, values) > best_steps

    def _best_at(self, study: optuna.Study, batch: object) -> tuple[float, float | None] | None:
        """(steps, lr) of the COMPLETE trial with the fewest steps to the target at `batch`, its
        first seed's steps where recorded (the seed a trial is judged on), else its value."""
        if batch is None:
            return None
        best: tuple[float, float | None] | None = None
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.params.get("batch_size") != batch or t.values is None or len(t.values) != 1:
                continue
            steps = float(t.user_attrs.get(FIRST_SEED_STEPS, t.values[0]))
            # Infinite: the target was never reached, which beats nobody.
            if math.isfinite(steps) and (best is None or steps < best[0]):
                best = (steps, t.params.get("lr"))
        return best

    def _steps_still_needed(self, steps: Sequence[float], values: Sequence[float]) -> float:
        """Steps from the last evaluation to the target along the optimistic straight line."""
        recent = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)][-self._window :]
        pairs = itertools.pairwise(recent)
        rate = max((self._sign * (v1 - v0) / (s1 - s0) for (s0, v0), (s1, v1) in pairs if s1 > s0), default=0.0)
        if not rate > 0:
            return math.inf
        closest = max(self._sign * v for v in values if math.isfinite(v))
        return (self._sign * self._target - closest) / rate

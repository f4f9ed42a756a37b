"""One batch size's search in log lr, on a grid: what is known at each point, and where to look next.

Used by `batchscope.sweeps.frontier`: step out with doubling steps until the best point has a worse one on
each side (or the grid's edge), then refine inside that bracket until both neighbours are known, or
until a neighbour is within the noise of the best (the points between could not be told apart).
A line where no trial reached the target, with misses on both sides of the lr the others predict,
is unreachable: it is done, not walked to the grid's end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from optuna.trial import FrozenTrial

# What is known at a grid point, weakest first: a later, stronger observation overrides.
EMPTY, PENDING, WORSE, DIVERGED, FINITE = 0, 1, 2, 3, 4
_MAX_DOUBLINGS = 4  # steps out grow 1, 2, 4, 8, 16 times the first one
_GOLDEN = 0.382  # (3 − √5)/2: golden section's share of the wider side
_MIN_MISSES = 3  # a line is unreachable after this many misses around the predicted lr (and none reached)
# Within the noise: a neighbour at most this many noise standard deviations worse than the best. Two
# independent readings differ by √2·σ on average, so 2σ is about 1.4 standard deviations of their
# difference: most draws of two equal points.
_WITHIN_NOISE = 2.0


class Line:
    """The lr grid of one batch size: a status and the best finite loss at every point."""

    def __init__(self, log_lrs: np.ndarray) -> None:
        self.log_lrs = log_lrs
        self.status = np.zeros(len(log_lrs), dtype=int)
        self.loss = np.full(len(log_lrs), math.inf)
        self.best_trial: FrozenTrial | None = None  # the trial of the lowest finite loss
        self._best_trial_loss = math.inf

    def add(self, i: int, kind: int, loss: float, trial: FrozenTrial | None) -> None:
        self.status[i] = max(self.status[i], kind)
        if kind == FINITE:
            self.loss[i] = min(self.loss[i], loss)
            if loss < self._best_trial_loss:
                self.best_trial, self._best_trial_loss = trial, loss

    def occupied(self) -> np.ndarray:
        return self.status != EMPTY

    def finished(self) -> np.ndarray:
        return self.status >= WORSE

    def best(self) -> int | None:
        finite = self.status == FINITE
        return int(np.argmin(np.where(finite, self.loss, math.inf))) if finite.any() else None

    def best_loss(self) -> float | None:
        b = self.best()
        return None if b is None else float(self.loss[b])

    def _neighbours(self, b: int) -> tuple[int | None, int | None]:
        """The nearest finished points below and above b; the edge itself when b is at it."""
        below = np.flatnonzero(self.finished()[:b])
        above = np.flatnonzero(self.finished()[b + 1 :]) + b + 1
        lo = int(below.max()) if below.size else (0 if b == 0 else None)
        hi = int(above.min()) if above.size else (len(self.status) - 1 if b == len(self.status) - 1 else None)
        return lo, hi

    def bracketed(self) -> bool:
        b = self.best()
        return b is not None and None not in self._neighbours(b)

    def resolved(self, predicted: int | None = None, stride: int = 1) -> bool:
        """Bracketed on both sides, or no finite result anywhere the grid still allows, or (given
        the `predicted` best lr index) unreachable: see `unreachable`."""
        if self.best() is not None:
            return self.bracketed()
        if not self.finished().any():
            return False
        if self._free_below_divergence().size == 0:
            return True
        return predicted is not None and self.unreachable(predicted, stride)

    def unreachable(self, predicted: int, stride: int) -> bool:
        """No trial reached a finite value, and at least `_MIN_MISSES` finished ones surround the
        predicted index by `stride` or more on each side (the grid's edge, or a divergence above,
        closes a side). Then the target is out of reach at this batch size in the budget
        (benchmark 8: batch 16 and 32 end at val_acc 0.41-0.49 under a 300-step budget for a
        target of 0.5 at every lr), and walking the rest of the line would not change that."""
        finished = np.flatnonzero(self.finished())
        if self.best() is not None or finished.size < _MIN_MISSES:
            return False
        top = self._top()
        centre = min(predicted, top - 1)
        low_side = finished.min() <= max(centre - stride, 0)
        high_side = top < len(self.status) or finished.max() >= min(centre + stride, len(self.status) - 1)
        return bool(low_side and high_side)

    def width(self) -> float:
        """The bracket's width in log lr (0 when not bracketed)."""
        b = self.best()
        if b is None:
            return 0.0
        lo, hi = self._neighbours(b)
        return 0.0 if lo is None or hi is None else float(self.log_lrs[hi] - self.log_lrs[lo])

    def _top(self) -> int:
        """The lowest diverged point (the grid's end if none): nothing at or above it is tried."""
        diverged = np.flatnonzero(self.status == DIVERGED)
        return int(diverged.min()) if diverged.size else len(self.status)

    def _free_below_divergence(self) -> np.ndarray:
        return np.flatnonzero(~self.occupied()[: self._top()])

    def proposal(
        self, predict: Callable[[], int], stride: int, noise: float = 0.0
    ) -> tuple[Literal["open", "refine"], int | None]:
        """("open", i): the best is not bracketed yet (or nothing finite was found); ("refine", i):
        inside the bracket; i None when nothing here is free now (done, unreachable, waiting on
        pending points, or the bracket's neighbours within `noise`: see `_refine`)."""
        b = self.best()
        if b is None:
            predicted = predict()
            if self.unreachable(predicted, stride):
                return "open", None
            return "open", self._search_without_finite(predicted, stride)
        lo, hi = self._neighbours(b)
        if lo is not None and hi is not None:
            return "refine", self._refine(b, lo, hi, noise)
        sides = [d for d, side in ((1, hi), (-1, lo)) if side is None]
        if len(sides) == 2 and predict() < b:
            sides.reverse()
        for d in sides:
            if (i := self._step_out(b, d, stride)) is not None:
                return "open", i
        return "open", None

    def _step_out(self, b: int, d: int, stride: int) -> int | None:
        """A step from b towards side d, doubling with the points already passed on the other side."""
        other = self.finished()[b + 1 :] if d < 0 else self.finished()[:b]
        doublings = min(max(int(other.sum()) - 1, 0), _MAX_DOUBLINGS)
        target = min(max(b + d * stride * 2**doublings, 0), len(self.status) - 1)
        occupied = self.occupied()
        for j in range(target, b, -d):
            if not occupied[j]:
                return j
        return None

    def _search_without_finite(self, predicted: int, stride: int) -> int | None:
        """No trial here reached a finite value: from the prediction outwards, below any divergence."""
        free = self._free_below_divergence()
        if free.size == 0:
            return None
        top = self._top()
        start = min(predicted, top - 1)
        occupied = self.occupied()
        if start >= 0 and not occupied[start]:
            return start
        taken = np.flatnonzero(occupied[:top])
        step = stride * 2 ** min(max(taken.size - 1, 0), _MAX_DOUBLINGS)
        down, up = max(int(taken.min()) - step, 0), min(int(taken.max()) + step, top - 1)
        below, above = int((taken < predicted).sum()), int((taken > predicted).sum())
        # A divergence says "lower"; otherwise the side tried less so far (up on a tie).
        order = [down, up] if top < len(self.status) or above > below else [up, down]
        for j in order:
            if not occupied[j]:
                return j
        return int(free[np.argmin(np.abs(free - predicted))])

    def settled(self, b: int, side: int, noise: float) -> bool:
        """Whether refining between the best `b` and its neighbour `side` is pointless: they are
        adjacent on the grid, or the neighbour's finite loss is within `_WITHIN_NOISE` × `noise`
        of the best's (`noise`: a standard deviation of one reading, in the units `noise_scale`
        gives; 0: never within noise). A worse-than-any (missed, pruned) or diverged neighbour is
        never within the noise: the target region often sits right next to the cliff."""
        if abs(side - b) <= 1:
            return True
        if self.status[side] != FINITE or not noise > 0:
            return False
        scaled = _scale(self.loss[[b, side]])
        return bool(scaled[1] - scaled[0] <= _WITHIN_NOISE * noise)

    def _refine(self, b: int, lo: int, hi: int, noise: float = 0.0) -> int | None:
        open_sides = [side for side in (lo, hi) if side != b and not self.settled(b, side, noise)]
        if not open_sides:
            return None
        occupied = self.occupied()
        if lo < b < hi and self.status[lo] == FINITE and self.status[hi] == FINITE:
            vertex = _parabola_vertex(self.log_lrs[[lo, b, hi]], self.loss[[lo, b, hi]])
            if vertex is not None:
                j = int(np.argmin(np.abs(self.log_lrs - vertex)))
                side = hi if j > b else lo
                if lo < j < hi and not occupied[j] and side in open_sides:
                    return j
        # Golden section: the wider side first (above on a tie: the cliff is there).
        for d, gap in sorted(((1, hi - b), (-1, b - lo)), key=lambda s: -s[1]):
            if gap <= 1 or (hi if d > 0 else lo) not in open_sides:
                continue
            target = b + d * max(1, round(_GOLDEN * gap))
            inside = range(b + d, b + d * gap, d)
            for j in sorted(inside, key=lambda j: abs(j - target)):
                if not occupied[j]:
                    return j
        return None


def _scale(losses: np.ndarray) -> np.ndarray:
    """Losses on the scale the noise is measured in: log when positive (steps to target, whose
    noise is relative: ±5 steps at 50 is ±50 at 500), as they are otherwise (−val_acc)."""
    return np.log(losses) if bool(np.all(losses > 0)) else losses


def noise_scale(lines: list[Line]) -> float:
    """The noise of one reading, pooled over the lines: the residual standard deviation of a
    parabola in log lr through each line's best finite point and up to two finite neighbours on
    each side (lines with at least four such points), sqrt(Σ RSS / Σ (n − 3)). 0 when no line has
    four points yet. Near its optimum a smooth line is close to a parabola in log lr (its
    second-order expansion: the sampler's own refinement assumes it), so what it leaves is mostly the
    noise of steps to target; a skewed line (a cliff) leaves more, which errs towards stopping
    refinement sooner."""
    rss, dof = 0.0, 0
    for line in lines:
        b = line.best()
        if b is None:
            continue
        finite = np.flatnonzero(line.status == FINITE)
        at = int(np.searchsorted(finite, b))
        near = finite[max(at - 2, 0) : at + 3]
        if near.size < 4:
            continue
        y = line.loss[near]
        if not bool(np.all(y > 0)) and bool(np.any(y > 0)):
            continue  # mixed signs: no common scale
        coefficients = np.polyfit(line.log_lrs[near], _scale(y), 2)
        residuals = _scale(y) - np.polyval(coefficients, line.log_lrs[near])
        rss += float(np.sum(residuals**2))
        dof += near.size - 3
    return math.sqrt(rss / dof) if dof else 0.0


def _parabola_vertex(x: np.ndarray, y: np.ndarray) -> float | None:
    """The minimum of the parabola through three points, or None if it opens downwards."""
    (x0, x1, x2), (y0, y1, y2) = x, y
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if denominator >= 0:  # collinear, or a maximum
        return None
    numerator = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    return float(x1 - 0.5 * numerator / denominator)

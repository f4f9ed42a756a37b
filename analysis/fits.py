"""Fits of the batch-size trade-offs, on plain arrays.

Critical batch size (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):
steps to a target S(B) = S_min (1 + B_crit/B) and examples to the target E(B) = E_min (1 + B/B_crit).
Since E = S·B, the two curves share their parameters (E_min = S_min·B_crit), so one fit gives
both. The fit is least squares on log S (the spread over seeds and learning rates is
multiplicative), with a residual bootstrap interval for B_crit: the batch sizes are the
design of the sweep, so they stay fixed while the noise is resampled.

Learning-rate law (McCandlish et al. 2018, eq. 2.6, for SGD): the best learning rate
lr*(B) = ε_max / (1 + B_*/B), linear in B below the knee B_* (their B_noise) and flat above.
log lr* = log ε_max − log(1 + B_*/B) is the critical-batch shape with the sign flipped, so it is
fitted by the same grid search and residual bootstrap. Beside it, the slope of a power law on the
points below the knee says which scaling holds there: 1 is linear scaling (Goyal et al. 2017,
"Accurate, Large Minibatch SGD"), 0.5 square-root scaling (Malladi et al. 2022, "On the SDEs
and Scaling Rules for Adaptive Gradient Algorithms", for Adam).

Learning-rate scaling as one power law: lr*(B) ∝ B^α by least squares on log lr* against log B,
with a Student-t interval on the slope (α = 1: linear scaling, α = 0.5: square-root scaling).
Across a knee it gives an in-between exponent that describes neither side; it is kept to be
shown beside the law above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize, stats

ArrayLike = Sequence[float] | np.ndarray

# B_crit is searched this far beyond the measured batch sizes (factor on either side): wider
# lets a sweep that only saw one regime say "B_crit is far out" instead of a wrong number.
_SEARCH_FACTOR = 1000.0
_GRID_POINTS = 2000


@dataclass(frozen=True)
class CriticalBatchFit:
    """S(B) = s_min (1 + b_crit/B) and E(B) = e_min (1 + B/b_crit), with e_min = s_min·b_crit."""

    s_min: float
    b_crit: float
    b_crit_low: float
    b_crit_high: float
    confidence: float
    n_points: int
    batch_size_range: tuple[float, float]
    at_search_edge: bool  # the best B_crit is at the edge of the search: not identified

    @property
    def e_min(self) -> float:
        return self.s_min * self.b_crit

    @property
    def within_measured_range(self) -> bool:
        low, high = self.batch_size_range
        return low <= self.b_crit <= high

    def steps(self, batch_size: ArrayLike) -> np.ndarray:
        return self.s_min * (1 + self.b_crit / np.asarray(batch_size, dtype=float))

    def samples(self, batch_size: ArrayLike) -> np.ndarray:
        return self.e_min * (1 + np.asarray(batch_size, dtype=float) / self.b_crit)


@dataclass(frozen=True)
class LrLawFit:
    """Best learning rate lr*(B) = eps_max / (1 + b_star/B), and the slope of log lr* below the knee.

    Fields ending in _low/_high are bootstrap percentile bounds (at the fit's confidence);
    slope_below is the exponent of a power law on the points at or below b_star
    (slope_points = "below_knee"), or on the three smallest batch sizes when fewer than two
    lie there (slope_points = "smallest"); n_below counts the points it used.
    """

    eps_max: float
    eps_max_low: float
    eps_max_high: float
    b_star: float
    b_star_low: float
    b_star_high: float
    slope_below: float
    slope_below_low: float
    slope_below_high: float
    n_below: int
    slope_points: Literal["below_knee", "smallest"]
    confidence: float
    n_points: int
    batch_size_range: tuple[float, float]
    at_search_edge: bool  # the best b_star is at the edge of the search: not identified

    def predict(self, batch_size: ArrayLike) -> np.ndarray:
        return self.eps_max / (1 + self.b_star / np.asarray(batch_size, dtype=float))


@dataclass(frozen=True)
class PowerLawFit:
    """y = prefactor · x^exponent, with a confidence interval on the exponent (NaN if n < 3)."""

    exponent: float
    exponent_low: float
    exponent_high: float
    prefactor: float
    confidence: float
    n_points: int

    def predict(self, x: ArrayLike) -> np.ndarray:
        return self.prefactor * np.asarray(x, dtype=float) ** self.exponent


def _log_steps_points(
    batch_sizes: ArrayLike, steps: ArrayLike, samples: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """Usable (B, log S) points; with samples, log S is the mean of log S and log(E/B)."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape:
        raise ValueError(f"batch_sizes and steps differ in shape: {b.shape=} {s.shape=}")
    log_s = np.log(np.where(s > 0, s, np.nan))
    if samples is not None:
        e = np.asarray(samples, dtype=float)
        if e.shape != b.shape:
            raise ValueError(f"batch_sizes and samples differ in shape: {b.shape=} {e.shape=}")
        log_e_per_b = np.log(np.where(e > 0, e, np.nan) / b)
        log_s = np.where(np.isfinite(log_e_per_b), (log_s + log_e_per_b) / 2, log_s)
    usable = np.isfinite(b) & (b > 0) & np.isfinite(log_s)
    return b[usable], log_s[usable]


def _shape(b: np.ndarray, log_b_crit: np.ndarray) -> np.ndarray:
    """log(1 + B_crit/B) for every grid value (rows) and batch size (columns)."""
    return np.log1p(np.exp(log_b_crit)[:, None] / b[None, :])


def _best_on_grid(y: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """For each row of y (bootstrap replicates), the grid index minimising the squared error.

    With the knee (B_crit) fixed, the best intercept (log S_min) is the mean residual, so the
    error of grid value g is |yc|² − 2 yc·gc + |gc|² with yc, gc centred: one matrix product for
    all replicates.
    """
    yc = y - y.mean(axis=1, keepdims=True)
    gc = shape - shape.mean(axis=1, keepdims=True)
    sse = -2 * yc @ gc.T + (gc**2).sum(axis=1)[None, :]
    return np.asarray(np.argmin(sse, axis=1))


@dataclass(frozen=True)
class _KneeFit:
    """y = intercept + sign·log(1 + exp(log_knee)/B), with bootstrap replicates of both parameters."""

    log_knee: float
    intercept: float
    boot_log_knee: np.ndarray
    boot_intercept: np.ndarray
    at_search_edge: bool  # the best knee is at the edge of the search: not identified


def _fit_knee(b: np.ndarray, y: np.ndarray, *, sign: float, n_bootstrap: int, seed: int) -> _KneeFit:
    """Least squares of y = c + sign·log(1 + b*/B): a grid over log b*, a bounded refine, c in closed form.

    sign = +1 is the steps curve (log S rises towards small B), sign = −1 the learning-rate curve
    (log lr falls towards small B). Fitting sign·y with sign = +1 is the same problem, and for
    sign = +1 the arithmetic is exactly that of the plain fit.
    """
    z = sign * y
    log_lo, log_hi = np.log(b.min() / _SEARCH_FACTOR), np.log(b.max() * _SEARCH_FACTOR)
    grid = np.linspace(log_lo, log_hi, _GRID_POINTS)
    shape = _shape(b, grid)
    start = grid[_best_on_grid(z[None, :], shape)[0]]

    def sse(log_knee: float) -> float:
        g = np.log1p(np.exp(log_knee) / b)
        r = z - g
        return float(((r - r.mean()) ** 2).sum())

    step = grid[1] - grid[0]
    refined = optimize.minimize_scalar(
        sse, bounds=(max(log_lo, start - step), min(log_hi, start + step)), method="bounded"
    )
    log_knee = float(refined.x) if refined.success else float(start)
    g = np.log1p(np.exp(log_knee) / b)
    intercept = float((z - g).mean())

    # Residual bootstrap; residuals are inflated by n/(n-2) for the two fitted parameters.
    fitted = intercept + g
    residuals = (z - fitted) * np.sqrt(b.size / (b.size - 2))
    rng = np.random.default_rng(seed)
    draws = fitted[None, :] + rng.choice(residuals, size=(n_bootstrap, b.size), replace=True)
    boot_index = _best_on_grid(draws, shape)
    # With the knee fixed, the best intercept of a replicate is its mean residual.
    boot_intercept = (draws - shape[boot_index]).mean(axis=1)
    return _KneeFit(
        log_knee=log_knee,
        intercept=sign * intercept,
        boot_log_knee=grid[boot_index],
        boot_intercept=sign * boot_intercept,
        at_search_edge=bool(log_knee <= grid[1] or log_knee >= grid[-2]),
    )


def _interval(boot: np.ndarray, estimate: float, confidence: float) -> tuple[float, float]:
    """Percentile interval of the replicates, widened to contain the estimate."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(min(low, estimate)), float(max(high, estimate))


def fit_critical_batch(
    batch_sizes: ArrayLike,
    steps_to_target: ArrayLike,
    *,
    samples_to_target: ArrayLike | None = None,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CriticalBatchFit | None:
    """Fit S_min and B_crit; None when fewer than 3 usable points or 2 distinct batch sizes.

    Points are individual runs (several seeds or batch sizes); non-positive or missing steps
    (target never reached) are ignored.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), but got {confidence=}.")
    b, log_s = _log_steps_points(batch_sizes, steps_to_target, samples_to_target)
    if b.size < 3 or np.unique(b).size < 2:
        return None

    knee = _fit_knee(b, log_s, sign=1.0, n_bootstrap=n_bootstrap, seed=seed)
    low, high = _interval(knee.boot_log_knee, knee.log_knee, confidence)
    return CriticalBatchFit(
        s_min=float(np.exp(knee.intercept)),
        b_crit=float(np.exp(knee.log_knee)),
        b_crit_low=float(np.exp(low)),
        b_crit_high=float(np.exp(high)),
        confidence=confidence,
        n_points=int(b.size),
        batch_size_range=(float(b.min()), float(b.max())),
        at_search_edge=knee.at_search_edge,
    )


def fit_power_law(x: ArrayLike, y: ArrayLike, *, confidence: float = 0.95) -> PowerLawFit | None:
    """Least squares of log y on log x; None with fewer than 2 distinct positive x."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), but got {confidence=}.")
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    usable = np.isfinite(xs) & np.isfinite(ys) & (xs > 0) & (ys > 0)
    xs, ys = xs[usable], ys[usable]
    if np.unique(xs).size < 2:
        return None
    result = stats.linregress(np.log(xs), np.log(ys))
    low = high = float("nan")
    if xs.size >= 3:
        half = stats.t.ppf((1 + confidence) / 2, df=xs.size - 2) * result.stderr
        low, high = result.slope - half, result.slope + half
    return PowerLawFit(
        exponent=float(result.slope),
        exponent_low=float(low),
        exponent_high=float(high),
        prefactor=float(np.exp(result.intercept)),
        confidence=confidence,
        n_points=int(xs.size),
    )


def fit_lr_exponent(batch_sizes: ArrayLike, best_lrs: ArrayLike, *, confidence: float = 0.95) -> PowerLawFit | None:
    """α in lr*(B) ∝ B^α from the best learning rate of each batch size."""
    return fit_power_law(batch_sizes, best_lrs, confidence=confidence)


def _log_lr_points(batch_sizes: ArrayLike, best_lrs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Usable (B, log lr) points: positive finite batch sizes and learning rates."""
    b = np.asarray(batch_sizes, dtype=float)
    lr = np.asarray(best_lrs, dtype=float)
    if b.shape != lr.shape:
        raise ValueError(f"batch_sizes and best_lrs differ in shape: {b.shape=} {lr.shape=}")
    log_lr = np.log(np.where(lr > 0, lr, np.nan))
    usable = np.isfinite(b) & (b > 0) & np.isfinite(log_lr)
    return b[usable], log_lr[usable]


def _slope_points(b: np.ndarray, b_star: float) -> tuple[np.ndarray, Literal["below_knee", "smallest"]]:
    """Which points the slope below the knee is fitted on (a boolean mask), and why."""
    below = b <= b_star
    if np.unique(b[below]).size >= 2:
        return below, "below_knee"
    return b <= np.unique(b)[:3].max(), "smallest"


def fit_lr_law(
    batch_sizes: ArrayLike,
    best_lrs: ArrayLike,
    *,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LrLawFit | None:
    """Fit lr*(B) = eps_max / (1 + b_star/B); None with fewer than 3 usable points or 2 distinct batch sizes.

    Points are (batch size, best learning rate) pairs, one or several per batch size (e.g. one
    per seed); non-positive or missing learning rates are ignored. The fit is least squares on
    log lr, with a residual bootstrap for b_star and eps_max.

    How to read it:

    - slope_below, the exponent of lr* ∝ B^slope at and below the knee: near 1 is linear scaling
      (Goyal et al. 2017; McCandlish et al. 2018 for SGD), near 0.5 square-root scaling
      (Malladi et al. 2022, for Adam), near 0 no dependence. Even on points exactly on the law
      it is below 1, because the curve bends towards the knee (local slope b_star/(B + b_star),
      1/2 at the knee): about 0.66 for points spanning b_star/4…b_star, 0.78 for b_star/16…
      b_star, 0.85 for b_star/64…b_star. Its interval covers the noise, not this bend. A
      square-root law with a knee gives about half these numbers.
    - The law's slope below the knee is 1 by construction, so it fits other laws too, with the
      knee somewhere: lr* ∝ B^0.5 over all batch sizes is fitted with b_star inside the range,
      and only slope_below (≈ 0.5) shows that the law is the wrong one.
    - at_search_edge: b_star is not identified. Far above the measured batch sizes: lr* still
      rises linearly at the largest one (slope_below is then the power law over all points).
      Far below: lr* is flat, or falls with B (a law this model does not describe); slope_below
      is then from the three smallest batch sizes (slope_points = "smallest").
    - The best learning rates come from a discrete search, so every number here is only as
      good as its resolution: rounding each lr* to a grid with ratio r between neighbours can
      move a slope by up to log r / log(B_max/B_min) (0.14 for r = 2 over 16…2048).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), but got {confidence=}.")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, but got {n_bootstrap=}.")
    b, log_lr = _log_lr_points(batch_sizes, best_lrs)
    if b.size < 3 or np.unique(b).size < 2:
        return None

    knee = _fit_knee(b, log_lr, sign=-1.0, n_bootstrap=n_bootstrap, seed=seed)
    b_star = float(np.exp(knee.log_knee))
    b_star_low, b_star_high = _interval(knee.boot_log_knee, knee.log_knee, confidence)
    eps_low, eps_high = _interval(knee.boot_intercept, knee.intercept, confidence)
    mask, slope_points = _slope_points(b, b_star)
    slope = fit_power_law(b[mask], np.exp(log_lr[mask]), confidence=confidence)
    nan = float("nan")
    return LrLawFit(
        eps_max=float(np.exp(knee.intercept)),
        eps_max_low=float(np.exp(eps_low)),
        eps_max_high=float(np.exp(eps_high)),
        b_star=b_star,
        b_star_low=float(np.exp(b_star_low)),
        b_star_high=float(np.exp(b_star_high)),
        slope_below=slope.exponent if slope else nan,
        slope_below_low=slope.exponent_low if slope else nan,
        slope_below_high=slope.exponent_high if slope else nan,
        n_below=int(mask.sum()),
        slope_points=slope_points,
        confidence=confidence,
        n_points=int(b.size),
        batch_size_range=(float(b.min()), float(b.max())),
        at_search_edge=knee.at_search_edge,
    )

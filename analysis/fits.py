"""Fits of the batch-size trade-offs, on plain arrays.

Critical batch size (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"):
steps to a target S(B) = S_min (1 + B_crit/B) and examples to the target E(B) = E_min (1 + B/B_crit).
Since E = S·B, the two curves share their parameters (E_min = S_min·B_crit), so one fit gives
both. The fit is least squares on log S (the spread over seeds and learning rates is
multiplicative), with a residual bootstrap interval for B_crit: the batch sizes are the
design of the sweep, so they stay fixed while the noise is resampled.

Learning-rate scaling: lr*(B) ∝ B^α by least squares on log lr* against log B, with a
Student-t interval on the slope (α = 1: linear scaling, α = 0.5: square-root scaling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    With B_crit fixed, the best log S_min is the mean residual, so the error of grid value g is
    |yc|² − 2 yc·gc + |gc|² with yc, gc centred: one matrix product for all replicates.
    """
    yc = y - y.mean(axis=1, keepdims=True)
    gc = shape - shape.mean(axis=1, keepdims=True)
    sse = -2 * yc @ gc.T + (gc**2).sum(axis=1)[None, :]
    return np.asarray(np.argmin(sse, axis=1))


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

    log_lo, log_hi = np.log(b.min() / _SEARCH_FACTOR), np.log(b.max() * _SEARCH_FACTOR)
    grid = np.linspace(log_lo, log_hi, _GRID_POINTS)
    shape = _shape(b, grid)
    start = grid[_best_on_grid(log_s[None, :], shape)[0]]

    def sse(log_b_crit: float) -> float:
        g = np.log1p(np.exp(log_b_crit) / b)
        r = log_s - g
        return float(((r - r.mean()) ** 2).sum())

    step = grid[1] - grid[0]
    refined = optimize.minimize_scalar(
        sse, bounds=(max(log_lo, start - step), min(log_hi, start + step)), method="bounded"
    )
    log_b_crit = float(refined.x) if refined.success else float(start)
    g = np.log1p(np.exp(log_b_crit) / b)
    log_s_min = float((log_s - g).mean())

    # Residual bootstrap; residuals are inflated by n/(n-2) for the two fitted parameters.
    fitted = log_s_min + g
    residuals = (log_s - fitted) * np.sqrt(b.size / (b.size - 2))
    rng = np.random.default_rng(seed)
    draws = fitted[None, :] + rng.choice(residuals, size=(n_bootstrap, b.size), replace=True)
    boot = grid[_best_on_grid(draws, shape)]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return CriticalBatchFit(
        s_min=float(np.exp(log_s_min)),
        b_crit=float(np.exp(log_b_crit)),
        b_crit_low=float(np.exp(min(low, log_b_crit))),
        b_crit_high=float(np.exp(max(high, log_b_crit))),
        confidence=confidence,
        n_points=int(b.size),
        batch_size_range=(float(b.min()), float(b.max())),
        at_search_edge=bool(log_b_crit <= grid[1] or log_b_crit >= grid[-2]),
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

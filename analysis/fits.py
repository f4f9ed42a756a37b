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
fitted by the same grid search and residual bootstrap. ε_max and B_* are those of this law: it is
the one the theory predicts.

Its shape is checked with the generalized law lr*(B) = ε_max / (1 + (B_*/B)^α), fitted on its own
(α, B_* and ε_max together): for B ≪ B_* it is ε_max (B/B_*)^α, so α is the slope of log lr*
against log B below the knee, exactly 1 on McCandlish's law. α = 1 is linear scaling (Goyal et
al. 2017, "Accurate, Large Minibatch SGD"; McCandlish et al. for SGD), α = 0.5 square-root
scaling (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms",
for Adam). A power law on the points up to the knee cannot stand in for α: the curve is already
bending there (its local slope is 1/2 at B_*), so even exact points of McCandlish's law give it
0.68–0.86 over 16…2048, depending on where the knee is. The fit is a grid over (α, log B_*) with
log ε_max in closed form, then Levenberg–Marquardt from the best grid point; each replicate of
its residual bootstrap is fitted the same way.

Learning-rate scaling as one power law: lr*(B) ∝ B^α by least squares on log lr* against log B,
with a Student-t interval on the slope (α = 1: linear scaling, α = 0.5: square-root scaling).
Across a knee it gives an in-between exponent that describes neither side; it is kept to be
shown beside the law above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

# B_crit is searched this far beyond the measured batch sizes (factor on either side): wider
# lets a sweep that only saw one regime say "B_crit is far out" instead of a wrong number.
_SEARCH_FACTOR = 1000.0
_GRID_POINTS = 2000

# The generalized learning-rate law (see fit_lr_law): its exponent α is searched over a range that
# holds falling, flat, square-root, linear and steeper scaling. The grid (α in steps of 1/6, 100
# knees over the search range) only has to land in the right valley: a local refine follows, for
# the data and for each bootstrap replicate. At most _SLOPE_BOOTSTRAP replicates keep the
# replicate × grid matrix at 500 × 3100 values (12 MB).
_SLOPE_RANGE = (-2.0, 3.0)
_SLOPE_GRID_POINTS = 31
_SLOPE_KNEE_GRID_POINTS = 100
_SLOPE_BOOTSTRAP = 500
_REFINE_ITERATIONS = 30


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
    # Bootstrap intervals of S_min and E_min (from the same replicates as B_crit's).
    s_min_low: float = float("nan")
    s_min_high: float = float("nan")
    e_min_low: float = float("nan")
    e_min_high: float = float("nan")

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
    """Best learning rate lr*(B) = eps_max / (1 + b_star/B) (McCandlish et al. 2018), and the slope below its knee.

    eps_max, b_star, at_search_edge and predict() are McCandlish's law, the one the theory
    predicts. slope_below checks its shape: the exponent α of the generalized law
    lr*(B) = eps / (1 + (B_k/B)^α), fitted separately (its own knee B_k and prefactor), which is
    the slope of log lr* against log B below the knee, 1 on McCandlish's law. Fields ending in
    _low/_high are residual-bootstrap percentile bounds at the fit's confidence (the slope's are
    NaN with 3 points: nothing is left to resample).

    n_below counts the points at or below B_k. slope_identified is False when the data cannot
    tell α: fewer than 2 distinct batch sizes at or below B_k (lr* flat over the sweep puts the
    knee below it, where any α fits), or fewer than 3 distinct batch sizes in all (a knee can then
    be placed to fit any slope). A knee far above the sweep is identified: lr* still rises at the
    largest batch size, and α is the slope over all points.
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
    slope_identified: bool
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
    from scipy import optimize  # here: the sweep's frontier sampler imports this module as it starts (0.3 s)

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
    s_low, s_high = _interval(knee.boot_intercept, knee.intercept, confidence)
    e_low, e_high = _interval(knee.boot_intercept + knee.boot_log_knee, knee.intercept + knee.log_knee, confidence)
    return CriticalBatchFit(
        s_min=float(np.exp(knee.intercept)),
        b_crit=float(np.exp(knee.log_knee)),
        b_crit_low=float(np.exp(low)),
        b_crit_high=float(np.exp(high)),
        confidence=confidence,
        n_points=int(b.size),
        batch_size_range=(float(b.min()), float(b.max())),
        at_search_edge=knee.at_search_edge,
        s_min_low=float(np.exp(s_low)),
        s_min_high=float(np.exp(s_high)),
        e_min_low=float(np.exp(e_low)),
        e_min_high=float(np.exp(e_high)),
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
    from scipy import special, stats  # here: 0.3-0.7 s of imports that a sweep's start-up does not need

    result = stats.linregress(np.log(xs), np.log(ys))
    low = high = float("nan")
    if xs.size >= 3:
        half = special.stdtrit(xs.size - 2, (1 + confidence) / 2) * result.stderr  # Student's t quantile
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


def _general_shape(log_b: np.ndarray, slope: np.ndarray, log_knee: np.ndarray) -> np.ndarray:
    """log lr − log eps_max of the generalized law, for every (slope, log knee) pair (rows) and B (columns).

    −log(1 + (B_*/B)^α) for α ≥ 0; for α < 0, +log(1 + (B_*/B)^−α), so that α is the slope below
    the knee and the curve is flat above it whatever the sign (the plain formula with α < 0 would
    be flat below the knee and fall above it).
    """
    return -np.sign(slope)[:, None] * np.logaddexp(0.0, np.abs(slope)[:, None] * (log_knee[:, None] - log_b))


def _centred_residuals(log_b: np.ndarray, y: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residuals of each row of y from the law at its (α, log B_*) row of params, with the best
    intercept (their mean) taken out, and their derivatives in α and log B_* (rows × points × 2)."""
    slope, log_knee = params[:, :1], params[:, 1:]
    distance = log_knee - log_b
    shape = _general_shape(log_b, params[:, 0], params[:, 1])
    from scipy import special  # here, as optimize and stats below: not on a sweep's start-up path

    # d shape/dα = −σ(|α| d)·d and d shape/d log B_* = −α·σ(|α| d), on both sides of α = 0.
    weight = special.expit(np.abs(slope) * distance)
    jacobian = np.stack([weight * distance, weight * slope], axis=2)
    residuals = y - shape
    return residuals - residuals.mean(axis=1, keepdims=True), jacobian - jacobian.mean(axis=1, keepdims=True)


def _refine_slope_law(
    log_b: np.ndarray, y: np.ndarray, start: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Levenberg–Marquardt on (α, log B_*) for all rows of y at once from their grid points, kept in
    [low, high]. A step is taken only where it lowers the squared error; a row stops once its steps
    no longer lower it by more than a relative 1e-12, or cannot lower it at all."""
    params = start.copy()
    residuals, jacobian = _centred_residuals(log_b, y, params)
    sse = (residuals**2).sum(axis=1)
    damping = np.full(len(y), 1e-3)
    active = np.arange(len(y))
    for _ in range(_REFINE_ITERATIONS):
        j, r = jacobian[active], residuals[active]
        # The damped normal equations, 2 × 2 for each row, solved in closed form. A parameter at a
        # bound that the error would push past is held there (otherwise the clipped step of the
        # other one stalls, e.g. the slope of a power law while its knee is at the edge).
        a, c, d = (j[:, :, 0] ** 2).sum(axis=1), (j[:, :, 0] * j[:, :, 1]).sum(axis=1), (j[:, :, 1] ** 2).sum(axis=1)
        g = np.stack([(j[:, :, 0] * r).sum(axis=1), (j[:, :, 1] * r).sum(axis=1)], axis=1)
        free = ~(((params[active] >= high) & (g < 0)) | ((params[active] <= low) & (g > 0)))
        c = c * free[:, 0] * free[:, 1]
        a_damped = a + damping[active] * (a + 1e-12)
        d_damped = d + damping[active] * (d + 1e-12)
        det = a_damped * d_damped - c**2
        step = np.stack([d_damped * g[:, 0] - c * g[:, 1], a_damped * g[:, 1] - c * g[:, 0]], axis=1)
        step = step / det[:, None] * free
        trial = np.clip(params[active] - step, low, high)
        trial_residuals, trial_jacobian = _centred_residuals(log_b, y[active], trial)
        trial_sse = (trial_residuals**2).sum(axis=1)
        gain = sse[active] - trial_sse
        better = gain > 0
        moved = active[better]
        params[moved], residuals[moved], jacobian[moved] = (
            trial[better],
            trial_residuals[better],
            trial_jacobian[better],
        )
        sse[moved] = trial_sse[better]
        damping[active] = np.where(better, damping[active] / 3, damping[active] * 3)
        converged = (better & (gain <= 1e-12 * sse[active])) | (damping[active] > 1e10)
        active = active[~converged]
        if active.size == 0:
            break
    return params


@dataclass(frozen=True)
class _SlopeFit:
    """The exponent and knee of the generalized law, with bootstrap replicates of the exponent."""

    slope: float
    log_knee: float
    boot_slope: np.ndarray  # empty when no residual is left to resample (3 points)


def _fit_slope_law(b: np.ndarray, y: np.ndarray, *, n_bootstrap: int, seed: int) -> _SlopeFit:
    """Least squares of y = c + _general_shape(α, log B_*): a 2-D grid, then a local refine; c in closed form.

    The replicates of the residual bootstrap are fitted the same way as the data, so that the
    interval is not rounded to the grid.
    """
    log_b = np.log(b)
    log_lo, log_hi = np.log(b.min() / _SEARCH_FACTOR), np.log(b.max() * _SEARCH_FACTOR)
    slopes = np.linspace(*_SLOPE_RANGE, _SLOPE_GRID_POINTS)
    knees = np.linspace(log_lo, log_hi, _SLOPE_KNEE_GRID_POINTS)
    grid = np.stack([g.ravel() for g in np.meshgrid(slopes, knees, indexing="ij")], axis=1)
    shape = _general_shape(log_b, grid[:, 0], grid[:, 1])
    low, high = np.array([_SLOPE_RANGE[0], log_lo]), np.array([_SLOPE_RANGE[1], log_hi])

    def fit(rows: np.ndarray) -> np.ndarray:
        return _refine_slope_law(log_b, rows, grid[_best_on_grid(rows, shape)], low, high)

    slope, log_knee = fit(y[None, :])[0]
    if b.size <= 3:
        return _SlopeFit(slope=float(slope), log_knee=float(log_knee), boot_slope=np.empty(0))

    # Residual bootstrap; residuals are inflated by n/(n-3) for the three fitted parameters.
    residuals, _ = _centred_residuals(log_b, y[None, :], np.array([[slope, log_knee]]))
    fitted = y - residuals[0]
    rng = np.random.default_rng(seed)
    draws = fitted[None, :] + rng.choice(residuals[0] * np.sqrt(b.size / (b.size - 3)), size=(n_bootstrap, b.size))
    return _SlopeFit(slope=float(slope), log_knee=float(log_knee), boot_slope=fit(draws)[:, 0])


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
    per seed); non-positive or missing learning rates are ignored. Both fits are least squares on
    log lr with residual bootstrap intervals: McCandlish et al.'s law (α fixed at 1) gives eps_max
    and b_star, the law it predicts; the generalized law eps / (1 + (B_*/B)^α) gives slope_below
    = α, the check of its shape. The slope's bootstrap re-fits at most 500 replicates.

    How to read it:

    - slope_below, the slope of log lr* against log B below the knee: near 1 is linear scaling
      (Goyal et al. 2017; McCandlish et al. 2018 for SGD), near 0.5 square-root scaling
      (Malladi et al. 2022, for Adam), near 0 no dependence, negative a learning rate that falls
      with B (for α < 0 the generalized law is taken as eps·(1 + (B_*/B)^−α): falling below the
      knee, flat above, so α stays the slope below it). On points exactly on McCandlish's law it
      is 1; on noisy ones its 95% interval covered 1 in 89–96% of simulated sweeps (87% of the
      true exponent for a power law with no knee in range).
    - McCandlish's law has slope 1 below its knee by construction, so it fits other laws too,
      with the knee somewhere: lr* ∝ B^0.5 over all batch sizes is fitted with b_star inside the
      range, and only slope_below (≈ 0.5) shows that the law is the wrong one.
    - slope_identified = False: the slope is not told by the data (see LrLawFit); its interval
      is then wide (all of [−2, 3] for a flat lr*).
    - at_search_edge: b_star is not identified. Far above the measured batch sizes: lr* still
      rises at the largest one. Far below: lr* is flat, or falls with B (a law this model does
      not describe; slope_below is then negative).
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
    slope = _fit_slope_law(b, log_lr, n_bootstrap=min(n_bootstrap, _SLOPE_BOOTSTRAP), seed=seed)
    slope_low = slope_high = float("nan")
    if slope.boot_slope.size:
        slope_low, slope_high = _interval(slope.boot_slope, slope.slope, confidence)
    below = b <= np.exp(slope.log_knee)
    # With two batch sizes any slope fits, the knee placed to match; below the knee, two are needed.
    identified = np.unique(b).size >= 3 and np.unique(b[below]).size >= 2
    return LrLawFit(
        eps_max=float(np.exp(knee.intercept)),
        eps_max_low=float(np.exp(eps_low)),
        eps_max_high=float(np.exp(eps_high)),
        b_star=b_star,
        b_star_low=float(np.exp(b_star_low)),
        b_star_high=float(np.exp(b_star_high)),
        slope_below=slope.slope,
        slope_below_low=slope_low,
        slope_below_high=slope_high,
        n_below=int(below.sum()),
        slope_identified=bool(identified),
        confidence=confidence,
        n_points=int(b.size),
        batch_size_range=(float(b.min()), float(b.max())),
        at_search_edge=knee.at_search_edge,
    )

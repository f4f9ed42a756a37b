"""The gradient noise scale read back from the stores: B_simple over any stretch of training,
with its standard error.

B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A). The training loop logs each measurement's two-batch estimates of |G|² and tr(Σ)
as they came out (`gns/grad_sq`, `gns/trace_sigma` at the measuring step; negative ones
included: they are noise around a small true value, and dropping them would bias |G|²
upwards). Here any set of measurements becomes one estimate: the ratio of the means, as in
the paper's appendix, with the delta method's standard error and Fieller's interval (which,
unlike the delta method, admits that B_simple has no upper bound when the mean |G|² cannot be
told from 0: late in training at small batches). The loop's own `gns/b_simple`
(over its last `gns_window` steps) is for watching a run in MLflow; reports use this.

Stores written before batchscope logged every measurement hold smoothed values at evaluation
points under the same keys; their runs have no `gns_window` param and are not read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

GRAD_SQ = "gns/grad_sq"
TRACE = "gns/trace_sigma"
RAW_COLUMNS = ["run_id", "batch_size", "step", "grad_sq", "trace_sigma"]


CONFIDENCE = 0.95


@dataclass(frozen=True)
class NoiseEstimate:
    """B_simple from `n` measurements over `n_runs` runs, its delta-method standard error, and
    Fieller's interval (`low`, `high` at CONFIDENCE): `high` is inf when the mean |G|² is not
    distinguishable from 0, and `low` is then a lower bound (NaN: not even that)."""

    b_simple: float
    stderr: float
    n: int
    n_runs: int
    low: float = math.nan
    high: float = math.nan

    @property
    def defined(self) -> bool:
        return math.isfinite(self.b_simple)

    @property
    def bounded(self) -> bool:
        """Whether the interval is finite: the mean |G|² is clear of 0 and the delta method holds."""
        return self.defined and math.isfinite(self.low) and math.isfinite(self.high)

    def log_stderr(self) -> float:
        """Standard error of ln B_simple, from the interval (for ratios with other estimates)."""
        if not (self.bounded and self.low > 0):
            return math.nan
        return (math.log(self.high) - math.log(self.low)) / (2 * _z(CONFIDENCE))


def _z(confidence: float) -> float:
    return float(special.ndtri((1 + confidence) / 2))  # the normal quantile, as stats.norm.ppf


@dataclass(frozen=True)
class _Moments:
    """Means of |G|² and tr Σ reads, their variances and covariance as means, degrees of freedom."""

    g: float
    t: float
    var_g: float
    var_t: float
    cov: float
    df: int


def _moments(grad_sq: np.ndarray, trace_sigma: np.ndarray, groups: np.ndarray | None = None) -> _Moments | None:
    """Plain means, or with `groups` (the batch size of each read) inverse-variance weighted ones.

    A two-batch |G|² read's variance grows like (tr Σ/B)² when the noise dominates: pooled plainly,
    the reads of batch 16 would drown the far more precise ones of batch 1024. Each group's reads
    are weighted by the inverse of their observed |G|² variance; groups with one read are left out.
    """
    g, t = np.asarray(grad_sq, dtype=float), np.asarray(trace_sigma, dtype=float)
    if g.shape != t.shape:
        raise ValueError(f"need one tr(Σ) per |G|² estimate, got shapes {g.shape} and {t.shape}.")
    keys = np.zeros(g.size) if groups is None else np.asarray(groups)
    parts = []
    for key in np.unique(keys):
        gk, tk = g[keys == key], t[keys == key]
        if gk.size < 2:
            continue
        cov = np.cov(np.stack([gk, tk]), ddof=1)
        parts.append((gk.size, gk.mean(), tk.mean(), cov))
    if not parts:
        return None
    # Weight of each group's mean: its reads' count over their |G|² variance (plain means: the count).
    weights = np.array([n if groups is None else n / max(c[0, 0], 1e-300) for n, _, _, c in parts])
    weights = weights / weights.sum()
    var = sum(w**2 * c / n for w, (n, _, _, c) in zip(weights, parts, strict=True))
    return _Moments(
        g=float(sum(w * gm for w, (_, gm, _, _) in zip(weights, parts, strict=True))),
        t=float(sum(w * tm for w, (_, _, tm, _) in zip(weights, parts, strict=True))),
        var_g=float(var[0, 0]),
        var_t=float(var[1, 1]),
        cov=float(var[0, 1]),
        df=sum(n - 1 for n, _, _, _ in parts),
    )


def fieller_interval(
    grad_sq: np.ndarray,
    trace_sigma: np.ndarray,
    confidence: float = CONFIDENCE,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Fieller's interval for mean(tr Σ)/mean(|G|²) (Fieller 1954): every R with
    (t̄ − R·ḡ)² ≤ z²·Var(t̄ − R·ḡ), the means' variances and covariance from the measurements
    (weighted by group with `groups`, see `_moments`).

    Unlike the delta method it stays honest when the mean |G|² is near 0 (late in training,
    when B_simple is many times the batch size): the interval then has no upper end, and
    (low, inf) is returned; (nan, nan) when the measurements bound nothing.
    """
    m = _moments(grad_sq, trace_sigma, groups)
    if m is None:
        return math.nan, math.nan
    z2 = float(special.stdtrit(max(m.df, 1), (1 + confidence) / 2)) ** 2  # Student's t: windows hold few reads
    a = m.g**2 - z2 * m.var_g  # > 0 exactly when the mean |G|² is z standard errors clear of 0
    b = m.t * m.g - z2 * m.cov
    disc = b**2 - a * (m.t**2 - z2 * m.var_t)
    if a > 0 and disc >= 0:
        root = math.sqrt(disc)
        return (b - root) / a, (b + root) / a
    if a < 0 and disc >= 0 and m.t > 0:
        # Outside the two roots: of the two rays, the one with positive B_simple is [larger root, inf).
        return max((b + math.sqrt(disc)) / a, (b - math.sqrt(disc)) / a), math.inf
    return math.nan, math.nan


def ratio_of_means(
    grad_sq: np.ndarray, trace_sigma: np.ndarray, groups: np.ndarray | None = None
) -> tuple[float, float]:
    """mean(tr Σ)/mean(|G|²) and its delta-method standard error, sqrt(Var(t̄ − R·ḡ))/|ḡ|.

    Without `groups`, the same estimator as the training loop's (trainers.noise_scale_in_loop.ratio_of_means;
    analysis does not import trainers). NaN when the mean |G|² is not positive; NaN error below
    2 measurements.
    """
    g, t = np.asarray(grad_sq, dtype=float), np.asarray(trace_sigma, dtype=float)
    if g.shape != t.shape:
        raise ValueError(f"need one tr(Σ) per |G|² estimate, got shapes {g.shape} and {t.shape}.")
    m = _moments(g, t, groups)
    if m is None:
        ratio = float(t.mean() / g.mean()) if g.size == 1 and g.mean() > 0 else math.nan
        return ratio, math.nan
    if not m.g > 0:
        return math.nan, math.nan
    ratio = m.t / m.g
    return ratio, math.sqrt(max(m.var_t - 2 * ratio * m.cov + ratio**2 * m.var_g, 0.0)) / m.g


def estimate(raw: pd.DataFrame) -> NoiseEstimate:
    """One estimate from all the measurements in `raw` (rows of `measurements`); several batch
    sizes are pooled with inverse-variance weights (`_moments`)."""
    g, t = raw["grad_sq"].to_numpy(dtype=float), raw["trace_sigma"].to_numpy(dtype=float)
    groups = raw["batch_size"].to_numpy(dtype=float) if raw["batch_size"].nunique() > 1 else None
    b, se = ratio_of_means(g, t, groups)
    low, high = fieller_interval(g, t, groups=groups)
    return NoiseEstimate(b, se, len(raw), int(raw["run_id"].nunique()) if len(raw) else 0, low, high)


def recorded(trials: pd.DataFrame) -> set[str]:
    """Run ids whose noise-scale keys hold every measurement (runs logged with a `gns_window`)."""
    if "gns_window" not in trials:
        return set()
    have = trials[pd.to_numeric(trials["gns_window"], errors="coerce").notna()]
    return set(have["run_id"].dropna().astype(str))


def measurements(history: pd.DataFrame, run_ids: set[str] | list[str]) -> pd.DataFrame:
    """The raw measurements of the given runs: run_id, batch_size, step, grad_sq, trace_sigma."""
    rows = history[history["key"].isin((GRAD_SQ, TRACE)) & history["run_id"].isin(list(run_ids))]
    if rows.empty:
        return pd.DataFrame(columns=RAW_COLUMNS)
    wide = rows.pivot_table(
        index=["run_id", "batch_size", "step"], columns="key", values="value", aggfunc="last", observed=True
    )
    wide = wide.dropna(subset=[c for c in (GRAD_SQ, TRACE) if c in wide])
    if GRAD_SQ not in wide or TRACE not in wide:
        return pd.DataFrame(columns=RAW_COLUMNS)
    wide = wide.rename(columns={GRAD_SQ: "grad_sq", TRACE: "trace_sigma"}).reset_index()
    wide["run_id"] = wide["run_id"].astype(str)
    return wide[RAW_COLUMNS].sort_values(["run_id", "step"]).reset_index(drop=True)


def between(raw: pd.DataFrame, run_steps: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """The measurements of each run within its own (low, high] steps."""
    parts = [
        raw[(raw["run_id"] == run_id) & (raw["step"] > low) & (raw["step"] <= high)]
        for run_id, (low, high) in run_steps.items()
    ]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else raw.iloc[:0]


def over_training(raw: pd.DataFrame, window: float) -> pd.DataFrame:
    """Per run, B_simple over consecutive windows of `window` steps: run_id, batch_size, step
    (the window's end), b_simple, stderr, low, high (Fieller's interval), n. Windows whose mean
    |G|² is not positive are kept with NaN (undefined there), not dropped."""
    columns = ["run_id", "batch_size", "step", "b_simple", "stderr", "low", "high", "n"]
    if raw.empty:
        return pd.DataFrame(columns=columns)
    if not window > 0:
        raise ValueError(f"window must be positive, but got {window=}.")
    rows = []
    for (run_id, batch_size), run in raw.groupby(["run_id", "batch_size"], observed=True, sort=False):
        bins = np.ceil(run["step"].to_numpy(dtype=float) / window)
        for index, part in run.groupby(bins, sort=True):
            g, t = part["grad_sq"].to_numpy(dtype=float), part["trace_sigma"].to_numpy(dtype=float)
            b, se = ratio_of_means(g, t)
            rows.append((run_id, batch_size, float(index) * window, b, se, *fieller_interval(g, t), len(part)))
    return pd.DataFrame(rows, columns=columns)


def window_of(trials: pd.DataFrame, run_ids: list[str]) -> float | None:
    """The runs' `gns_window` (steps), the loop's window: the charts use the same one."""
    if "gns_window" not in trials:
        return None
    values = pd.to_numeric(trials.loc[trials["run_id"].isin(run_ids), "gns_window"], errors="coerce").dropna()
    return float(values.median()) if not values.empty else None

"""The gradient noise scale read back from the stores: B_simple over any stretch of training,
with its standard error.

B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A). The training loop logs each measurement's two-batch estimates of |G|² and tr(Σ)
as they came out (`gns/grad_sq`, `gns/trace_sigma` at the measuring step; negative ones
included: they are noise around a small true value, and dropping them would bias |G|²
upwards). Here any set of measurements becomes one estimate: the ratio of the means, as in
the paper's appendix, with the delta method's standard error. The loop's own `gns/b_simple`
(over its last `gns_window` steps) is for watching a run in MLflow; reports use this.

Stores written before batchscope logged every measurement hold smoothed values at evaluation
points under the same keys; their runs have no `gns_window` param and are not read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

GRAD_SQ = "gns/grad_sq"
TRACE = "gns/trace_sigma"
RAW_COLUMNS = ["run_id", "batch_size", "step", "grad_sq", "trace_sigma"]


@dataclass(frozen=True)
class NoiseEstimate:
    """B_simple from `n` measurements over `n_runs` runs, and its standard error (NaN: undefined)."""

    b_simple: float
    stderr: float
    n: int
    n_runs: int

    @property
    def defined(self) -> bool:
        return math.isfinite(self.b_simple)

    def log_stderr(self) -> float:
        """Standard error of ln B_simple (delta method), for ratios with other estimates."""
        return self.stderr / self.b_simple if self.defined and self.b_simple > 0 else math.nan


def ratio_of_means(grad_sq: np.ndarray, trace_sigma: np.ndarray) -> tuple[float, float]:
    """mean(tr Σ)/mean(|G|²) and its delta-method standard error, sqrt(Var(t − R·g)/n)/|ḡ|.

    The same estimator as the training loop's (trainers.gns.ratio_of_means; analysis does not
    import trainers). NaN when the mean |G|² is not positive; NaN error below 2 measurements.
    """
    g, t = np.asarray(grad_sq, dtype=float), np.asarray(trace_sigma, dtype=float)
    if g.shape != t.shape:
        raise ValueError(f"need one tr(Σ) per |G|² estimate, got shapes {g.shape} and {t.shape}.")
    if g.size == 0 or not g.mean() > 0:
        return math.nan, math.nan
    ratio = float(t.mean() / g.mean())
    if g.size < 2:
        return ratio, math.nan
    return ratio, float(np.std(t - ratio * g, ddof=1) / math.sqrt(g.size) / g.mean())


def estimate(raw: pd.DataFrame) -> NoiseEstimate:
    """One estimate from all the measurements in `raw` (rows of `measurements`)."""
    b, se = ratio_of_means(raw["grad_sq"].to_numpy(), raw["trace_sigma"].to_numpy())
    return NoiseEstimate(b, se, len(raw), int(raw["run_id"].nunique()) if len(raw) else 0)


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
    (the window's end), b_simple, stderr, n. Windows whose mean |G|² is not positive are kept
    with NaN (undefined there), not dropped."""
    columns = ["run_id", "batch_size", "step", "b_simple", "stderr", "n"]
    if raw.empty:
        return pd.DataFrame(columns=columns)
    if not window > 0:
        raise ValueError(f"window must be positive, but got {window=}.")
    rows = []
    for (run_id, batch_size), run in raw.groupby(["run_id", "batch_size"], observed=True, sort=False):
        bins = np.ceil(run["step"].to_numpy(dtype=float) / window)
        for index, part in run.groupby(bins, sort=True):
            b, se = ratio_of_means(part["grad_sq"].to_numpy(), part["trace_sigma"].to_numpy())
            rows.append((run_id, batch_size, float(index) * window, b, se, len(part)))
    return pd.DataFrame(rows, columns=columns)


def window_of(trials: pd.DataFrame, run_ids: list[str]) -> float | None:
    """The runs' `gns_window` (steps), the loop's window: the charts use the same one."""
    if "gns_window" not in trials:
        return None
    values = pd.to_numeric(trials.loc[trials["run_id"].isin(run_ids), "gns_window"], errors="coerce").dropna()
    return float(values.median()) if not values.empty else None

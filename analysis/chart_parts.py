"""Axes helpers shared by the chart families: the batch-size axis, log scales, the B_crit band."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from batchscope.analysis import style
from batchscope.analysis.fits import CriticalBatchFit
from batchscope.analysis.style import BatchColors
from batchscope.analysis.text import interval, number

BATCH_LABEL = "batch size B [examples]"
MAX_CURVE_POINTS = 300  # per line: long histories are thinned before plotting
NO_BEST_LR = "no completed trial with a batch size, a learning rate and an objective value."


def batch_axis(ax: Axes, batch_sizes: Sequence[float]) -> None:
    """Log2 x axis with the measured batch sizes as ticks."""
    ax.set_xscale("log", base=2)
    ticks = sorted({int(b) for b in batch_sizes})
    if ticks:
        crowded = len(ticks) > 7
        ax.set_xticks(
            ticks, [str(t) for t in ticks], rotation=45 if crowded else 0, ha="right" if crowded else "center"
        )
        ax.minorticks_off()
        # The measured range, whatever a fit's interval spans (an unidentified one can reach 1e6).
        ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax.set_xlabel(BATCH_LABEL)


def log_if_spread(ax: Axes, values: np.ndarray, axis: str = "y", factor: float = 10.0) -> None:
    """Log scale when the positive values span more than `factor`."""
    values = values[np.isfinite(values)]
    if values.size and (values > 0).all() and values.max() / values.min() > factor:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def b_crit_band(ax: Axes, fit: CriticalBatchFit | None, *, vertical: bool) -> None:
    if fit is None:
        return
    label = f"B_crit = {number(fit.b_crit)} [{interval(fit.b_crit_low, fit.b_crit_high)}]"
    span, line = (ax.axvspan, ax.axvline) if vertical else (ax.axhspan, ax.axhline)
    span(fit.b_crit_low, fit.b_crit_high, color=style.FIT_COLOR, alpha=0.10, lw=0)
    line(fit.b_crit, color=style.FIT_COLOR, ls="--", lw=1.2, label=label)


def finite_rows(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The rows where every one of `columns` is a finite number (none when a column is missing)."""
    present = [c for c in columns if c in frame]
    if len(present) < len(columns):
        return frame.iloc[:0]
    mask = np.ones(len(frame), dtype=bool)
    for column in columns:
        mask &= np.isfinite(pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float))
    return frame[mask]


def batch_scatter(ax: Axes, rows: pd.DataFrame, column: str, colors: BatchColors, **kwargs: Any) -> None:
    """`rows[column]` against batch size, each point in its batch size's colour (`kwargs`: matplotlib's)."""
    ax.scatter(rows["batch_size"], rows[column], c=[colors(b) for b in rows["batch_size"]], **kwargs)

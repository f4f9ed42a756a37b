"""The learning rate × batch size chart: the objective per cell and the best lr's law."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from batchscope.analysis import style
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.chart_parts import BATCH_LABEL, NO_BEST_LR, batch_axis, finite_rows
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors
from batchscope.analysis.text import number

# --- 4. learning rate × batch size -------------------------------------------------------------


def _lr_rows(lrs: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Row index of each lr: the distinct values when there are few (a grid), else log bins."""
    distinct = np.unique(np.round(lrs, 12))
    if distinct.size <= 12:
        return np.searchsorted(distinct, np.round(lrs, 12)), [number(v) for v in distinct]
    n_bins = int(min(12, np.ceil(np.sqrt(distinct.size))))
    edges = np.geomspace(lrs.min(), lrs.max() * (1 + 1e-9), n_bins + 1)
    index = np.clip(np.searchsorted(edges, lrs, side="right") - 1, 0, n_bins - 1)
    centres = np.sqrt(edges[:-1] * edges[1:])
    return index, [f"~{number(c)}" for c in centres]


def lr_batch(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(2)
    summary = finite_rows(result.trial_summary, "batch_size", "lr")
    heat_title = "Objective per lr × batch size  (★ best per B; ○ ×, –: see caption)"
    ax = axes[0]
    if summary.empty:
        style.empty_panel(ax, heat_title, "Not enough data: no trial has\na batch size and a learning rate.")
    else:
        _heatmap(ax, fig, summary, result)
        ax.set_title(heat_title, fontsize=9.5)

    ax = axes[1]
    fastest = result.lr_basis == "fastest"
    title = "Learning rate fastest to the target vs batch size" if fastest else "Best learning rate vs batch size"
    best = result.lr_points
    if best.empty:
        style.empty_panel(ax, title, f"Not enough data: {NO_BEST_LR}")
        return fig
    # The fits are of the effective lr when a scaling rule sets it from the batch size: so is the axis.
    best_lrs = best["fitted_lr"].to_numpy(dtype=float)
    ax.scatter(summary["batch_size"], summary[result.lr_column], s=10, color="0.75", label="tried", zorder=2)
    ax.scatter(
        best["batch_size"],
        best_lrs,
        s=60,
        edgecolor="white",
        zorder=4,
        c=[colors(b) for b in best["batch_size"]],
        label="fastest lr per B" if fastest else "best lr per B",
    )
    b = best["batch_size"].to_numpy(dtype=float)
    grid = np.geomspace(b.min() / 1.5, b.max() * 1.5, 100)
    edges = [int(x) in result.lr_edges for x in b]
    if any(edges):
        ax.scatter(b[edges], best_lrs[edges], s=150, facecolors="none",
                   edgecolors="0.3", lw=1.0, zorder=5, label="best at the edge of what was tried")  # fmt: skip
    law, power = result.lr_law, result.lr_scaling
    if law is not None:
        label = f"ε_max/(1 + B_*/B), B_* ≈ {number(law.b_star)}"
        ax.plot(grid, law.predict(grid), color=style.FIT_COLOR, lw=1.8, label=label)
        if not law.at_search_edge:
            ax.axvspan(law.b_star_low, law.b_star_high, color=style.FIT_COLOR, alpha=0.08, lw=0)
            ax.axvline(law.b_star, color=style.FIT_COLOR, ls=":", lw=1.0)
    if power is not None:
        ax.plot(grid, power.predict(grid), color=style.REFERENCE_COLOR, ls="--",
                lw=1.0, label=f"one power law B^{power.exponent:.2f}")  # fmt: skip
    if law is None and power is None:
        ax.text(
            0.03,
            0.04,
            "lr law not fitted: one batch size",
            transform=ax.transAxes,
            fontsize=8,
            color=style.EMPTY_COLOR,
            bbox=style.NOTE_BOX,
        )
    batch_axis(ax, summary["batch_size"])
    ax.set_yscale("log")
    ax.set_ylabel("learning rate" if result.lr_rule == "none" else f"effective lr ({result.lr_rule} scaling)")
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


def _heatmap(ax: Axes, fig: Figure, summary: pd.DataFrame, result: SweepAnalysis) -> None:
    batch_sizes = sorted({int(b) for b in summary["batch_size"]})
    col = np.searchsorted(batch_sizes, summary["batch_size"].to_numpy(dtype=int))
    row, labels = _lr_rows(summary["lr"].to_numpy(dtype=float))
    score = summary[result.score].to_numpy(dtype=float)
    statuses = summary["status"].astype(str).to_numpy() if "status" in summary else np.full(len(summary), "")
    grid = np.full((len(labels), len(batch_sizes)), np.nan)
    marks: dict[tuple[int, int], str] = {}
    pick = np.fmin if result.minimize else np.fmax
    for r, c, s, status in zip(row, col, score, statuses, strict=True):
        if np.isfinite(s):
            grid[r, c] = s if np.isnan(grid[r, c]) else pick(grid[r, c], s)
        elif (r, c) not in marks or status == "ok":
            # Completed without a value (the target never reached) is its own mark, not a failure.
            marks[(r, c)] = "○" if status == "ok" else "–" if status == "pruned" else "×"
    finite = grid[np.isfinite(grid)]
    norm: Normalize
    if finite.size and (finite > 0).all() and finite.max() / finite.min() > 10:
        norm = LogNorm(finite.min(), finite.max())
    else:
        norm = Normalize(finite.min() if finite.size else 0, finite.max() if finite.size else 1)
    cmap = "magma_r" if result.minimize else "magma"
    mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, edgecolors="white", lw=0.5)
    fig.colorbar(mesh, ax=ax, label=result.score_label, fraction=0.05, pad=0.02)
    # Tried but no objective value: marked, so it is not read as "untried".
    for (r, c), mark in marks.items():
        if not np.isfinite(grid[r, c]):
            ax.text(c + 0.5, r + 0.5, mark, ha="center", va="center", color="0.5", fontsize=11)
    if finite.size:
        best_rows = (np.nanargmin if result.minimize else np.nanargmax)(
            np.where(np.isfinite(grid), grid, np.inf if result.minimize else -np.inf), axis=0
        )
        for c, r in enumerate(best_rows):
            if np.isfinite(grid[r, c]):
                ax.text(
                    c + 0.5,
                    r + 0.5,
                    "★",
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=12,
                    path_effects=[patheffects.withStroke(linewidth=2, foreground="black")],
                )
    many = len(batch_sizes) > 6
    ax.set_xticks(
        np.arange(len(batch_sizes)) + 0.5,
        [str(b) for b in batch_sizes],
        rotation=45 if many else 0,
        ha="right" if many else "center",
    )
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels)
    ax.grid(False)
    ax.set_xlabel(BATCH_LABEL)
    ax.set_ylabel("learning rate (base)")

"""Charts of the search itself: Optuna's view of one study, and several studies compared."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from batchscope.analysis import style, tables
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.chart_parts import batch_axis, finite_rows, log_if_spread
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors

# --- 7. Optuna's view --------------------------------------------------------------------------


def optuna_view(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(2)
    ax = axes[0]
    title = "Optimization history"
    done = finite_rows(result.trial_summary, "trial", result.score)
    if "state" in done:
        done = done[done["state"].fillna("COMPLETE") == "COMPLETE"]
    if done.empty:
        style.empty_panel(ax, title, "Not enough data: no completed trial\nwith an objective value.")
    else:
        done = done.sort_values("trial")
        values = done[result.score].to_numpy(dtype=float)
        ax.scatter(
            done["trial"],
            values,
            s=18,
            zorder=3,
            c=[colors(b) if pd.notna(b) else "0.5" for b in done["batch_size"]],
        )
        best_so_far = np.minimum.accumulate(values) if result.minimize else np.maximum.accumulate(values)
        ax.step(done["trial"], best_so_far, where="post", color=style.FIT_COLOR, lw=1.4, label="best so far")
        log_if_spread(ax, values)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(done) == 1:
            ax.set_xlim(done["trial"].iloc[0] - 1, done["trial"].iloc[0] + 1)
        ax.set_xlabel("trial number")
        ax.set_ylabel(result.score_label)
        ax.set_title(title)
        ax.legend(loc="best")

    ax = axes[1]
    title = "Parameter importances (fANOVA)"
    if not result.importances:
        style.empty_panel(ax, title, result.importance_note or "Not enough data.")
        return fig
    names = list(result.importances)[::-1]
    ax.barh(names, [result.importances[n] for n in names], color="#4c72b0")
    for i, name in enumerate(names):
        ax.text(result.importances[name], i, f" {result.importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(f"importance for {result.score_label} (sums to 1)")
    ax.set_title(title)
    ax.grid(axis="y", visible=False)
    return fig


# --- comparison of several studies -------------------------------------------------------------


def comparison(studies: Sequence[tuple[str, SweepAnalysis]]) -> Figure:
    """Steps to target and time to target against batch size, one line per study."""
    fig, axes = style.figure(2)
    markers = "osD^v<>px*"
    for ax, column, y_label, title in (
        (axes[0], tables.STEPS, "steps to target [optimizer steps]", "Steps to target, by study"),
        (axes[1], tables.TIME, "time to target [s]", "Time to target, by study"),
    ):
        drawn: list[float] = []
        for i, (name, result) in enumerate(studies):
            shown = finite_rows(result.fastest, "batch_size", column)
            if shown.empty:
                continue
            short = name if len(name) <= 28 else name[:27] + "…"
            ax.plot(
                shown["batch_size"],
                shown[column],
                marker=markers[i % len(markers)],
                color=f"C{i % 10}",
                lw=1.4,
                label=short,
            )
            drawn += shown["batch_size"].tolist()
        if not drawn:
            style.empty_panel(ax, title, "No study reached its target:\nnothing to compare.")
            continue
        batch_axis(ax, drawn)
        ax.set_yscale("log")
        ax.set_ylabel(y_label)
        ax.set_title(title)
        ax.legend(loc="best")
    return fig

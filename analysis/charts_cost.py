"""Charts of what a batch size costs and gives: generalization, throughput and memory, inference."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchscope.analysis import style, tables
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.chart_parts import batch_axis, batch_scatter, finite_rows, log_if_spread
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors
from batchscope.analysis.text import number


def _memory_label(trials: pd.DataFrame) -> str:
    """What `mem/peak_mb` measured, as the trainer logged it (`memory_measure`)."""
    kinds = set(trials["memory_measure"].dropna().astype(str)) if "memory_measure" in trials else set()
    if kinds == {"cuda_max_allocated"}:
        return "peak CUDA memory allocated [MB]"
    if kinds == {"process_peak_rss"}:
        return "peak resident memory of the whole process [MB]\n(CPU: runtime and data too, not the model alone)"
    return "peak memory [MB] (CUDA: allocated; CPU: whole process)"


# --- 5. generalization -------------------------------------------------------------------------


def _per_batch_panel(
    ax: Axes,
    runs: pd.DataFrame,
    best_runs: dict[int, list[str]],
    column: str,
    colors: BatchColors,
    *,
    title: str,
    y_label: str,
) -> None:
    shown = finite_rows(runs, "batch_size", column)
    if shown.empty:
        style.empty_panel(ax, title, f"Not enough data: no run logged\n'{column}'.")
        return
    batch_scatter(ax, shown, column, colors, s=10, alpha=0.35)
    best_ids = {r for ids in best_runs.values() for r in ids}
    at_best = shown[shown["run_id"].isin(best_ids)]
    if not at_best.empty:
        stats = at_best.groupby("batch_size")[column].agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats["batch_size"],
            stats["mean"],
            yerr=stats["std"].fillna(0),
            color="0.25",
            lw=1.2,
            capsize=3,
            marker="o",
            markersize=4,
            label="best lr (mean ± sd)",
        )
    batch_axis(ax, shown["batch_size"])
    log_if_spread(ax, shown[column].to_numpy(dtype=float))
    ax.set_ylabel(y_label)
    ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[style.proxy("all runs"), *handles], loc="best")


def generalization(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(2)
    runs = sweep.trials.dropna(subset=["run_id"])
    _per_batch_panel(
        axes[0],
        runs,
        result.best_runs,
        "final/gen_gap",
        colors,
        title="Generalization gap vs batch size",
        y_label="gen gap (val − train loss)",
    )
    _per_batch_panel(
        axes[1],
        runs,
        result.best_runs,
        "final/sharpness",
        colors,
        title="Sharpness vs batch size",
        y_label="top Hessian eigenvalue",
    )
    return fig


# --- 6. cost -----------------------------------------------------------------------------------


def cost(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(3)
    costs = result.run_costs
    for ax, column, title, y_label in (
        (axes[0], "samples_per_s", "Throughput vs batch size", "throughput [examples/s]"),
        (axes[1], "peak_mb", "Peak memory vs batch size", _memory_label(sweep.trials)),
    ):
        shown = finite_rows(costs, "batch_size", column)
        if shown.empty:
            style.empty_panel(ax, title, f"Not enough data: no\n'{column}' measurements.")
            continue
        batch_scatter(ax, shown, column, colors, s=12, alpha=0.4)
        medians = shown.groupby("batch_size")[column].median()
        ax.plot(
            medians.index, medians.to_numpy(), color="0.25", marker="o", markersize=4, lw=1.2, label="median over runs"
        )
        if column == "samples_per_s" and len(medians) > 1:
            b0, t0 = float(medians.index[0]), float(medians.iloc[0])
            grid = np.asarray(medians.index, dtype=float)
            ax.plot(grid, t0 * grid / b0, color=style.REFERENCE_COLOR, ls=":", label="linear in B (ideal)")
        batch_axis(ax, shown["batch_size"])
        ax.set_yscale("log")
        ax.set_ylabel(y_label)
        ax.set_title(title)
        ax.legend(loc="best")

    ax = axes[2]
    title = "Time to target vs batch size"
    shown = finite_rows(result.fastest, "batch_size", tables.TIME)
    if shown.empty:
        style.empty_panel(ax, title, "No run reached the target:\nno time to target.")
        return fig
    ax.plot(shown["batch_size"], shown[tables.TIME], color="0.3", lw=1)
    batch_scatter(ax, shown, tables.TIME, colors, s=50, edgecolor="white", zorder=3)
    quickest = shown.loc[shown[tables.TIME].idxmin()]
    ax.scatter(
        [quickest["batch_size"]],
        [quickest[tables.TIME]],
        marker="*",
        s=220,
        color=style.FIT_COLOR,
        zorder=4,
        label=f"quickest: B = {int(quickest['batch_size'])}, {number(quickest[tables.TIME])} s",
    )
    batch_axis(ax, shown["batch_size"])
    log_if_spread(ax, shown[tables.TIME].to_numpy(dtype=float), factor=5)
    ax.set_ylabel("time to target [s]")
    ax.set_title(f"{title} (fastest lr per B)")
    ax.legend(loc="best")
    return fig


def throughput_latency(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    """Inference: samples/s against latency per call, one point per batch size (a Pareto view)."""
    data = sweep.throughput.dropna(subset=["samples_per_s", "latency_p50_ms"]).sort_values("batch_size")
    fig, axes = style.figure(1)
    ax = axes[0]
    ax.plot(data["latency_p50_ms"], data["samples_per_s"], color="0.6", lw=1, zorder=1)
    for _, row in data.iterrows():
        b = int(row["batch_size"])
        ax.errorbar(
            row["latency_p50_ms"],
            row["samples_per_s"],
            xerr=[[0.0], [max(0.0, row["latency_p95_ms"] - row["latency_p50_ms"])]],
            fmt="o",
            color=colors(b),
            zorder=2,
        )
        ax.annotate(f"B={b}", (row["latency_p50_ms"], row["samples_per_s"]), xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency per call, p50 (bar to p95) [ms]")
    ax.set_ylabel("inference throughput [examples/s]")
    ax.set_title("Inference: throughput against latency")
    return fig

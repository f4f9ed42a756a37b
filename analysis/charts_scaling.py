"""Charts of how training scales with batch size: convergence, steps and examples to target,
B_crit against compute, the gradient noise scale."""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from batchscope.analysis import noise, style, tables
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.chart_parts import (
    MAX_CURVE_POINTS,
    NO_BEST_LR,
    b_crit_band,
    batch_axis,
    batch_scatter,
    finite_rows,
    log_if_spread,
)
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors
from batchscope.analysis.text import interval, number

# --- 1. convergence ----------------------------------------------------------------------------


def convergence(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(6, rows=2)
    xs = [
        ("step", "optimizer steps", "log"),
        ("samples", "examples seen", "log"),
        ("time_s", "wall time since run start [s]", "auto"),
    ]
    for row, (key, name) in enumerate((("val/loss", "Validation"), ("train/loss", "Training"))):
        curves = {
            b: tables.seed_curve(sweep.history, runs, key, max_points=MAX_CURVE_POINTS)
            for b, runs in result.best_runs.items()
        }
        curves = {b: c for b, c in curves.items() if not c.empty}
        for col, (x, x_label, x_scale) in enumerate(xs):
            ax = axes[row * 3 + col]
            title = f"{name} loss vs {x_label.split(' [')[0]}"
            if not curves:
                if result.best_lr.empty:
                    empty_message = f"Not enough data: {NO_BEST_LR}"
                else:
                    empty_message = f"Not enough data: no '{key}' history\nat the best learning rates."
                style.empty_panel(ax, title, empty_message)
                continue
            for b, curve in curves.items():
                if x_scale == "log":
                    curve = curve[curve[x] > 0]  # the evaluation at initialization (step 0) has no place on a log axis
                ax.plot(curve[x], curve["mean"], color=colors(b), lw=1.4)
                if (curve["n_runs"] > 1).any():
                    ax.fill_between(curve[x], curve["low"], curve["high"], color=colors(b), alpha=0.18, lw=0)
            if x_scale == "auto":
                log_if_spread(ax, np.concatenate([c[x].to_numpy() for c in curves.values()]), axis="x", factor=20)
            else:
                ax.set_xscale(x_scale)
            log_if_spread(ax, np.concatenate([c["mean"].to_numpy() for c in curves.values()]), factor=3)
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{name.lower()} loss")
            ax.set_title(title)
    return fig


# --- 2. steps and samples to target ------------------------------------------------------------


def steps_to_target(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(2)
    points, fastest, fit = result.target_points, result.fastest, result.critical_batch
    panels = (
        (axes[0], tables.STEPS, "steps to target [optimizer steps]", "Steps to target"),
        (axes[1], tables.SAMPLES, "examples to target [examples]", "Examples to target"),
    )
    for ax, column, y_label, title in panels:
        shown = finite_rows(points, "batch_size", column)
        if shown.empty:
            n_runs = int(sweep.trials["run_id"].notna().sum())
            style.empty_panel(
                ax, title, f"No run reached the target ({n_runs} run{'s' * (n_runs != 1)}):\nnothing to plot."
            )
            continue
        batch_scatter(ax, shown, column, colors, s=14, alpha=0.5, zorder=3)
        means = finite_rows(fastest, "batch_size", column)
        ax.plot(means["batch_size"], means[column], color="0.3", lw=1, zorder=2)
        batch_scatter(ax, means, column, colors, s=60, edgecolor="white", zorder=4, label="fastest lr (mean)")
        b_lo, b_hi = float(shown["batch_size"].min()), float(shown["batch_size"].max())
        grid = np.geomspace(b_lo / 1.5, b_hi * 1.5, 200)
        first = means.iloc[0]
        # Perfect scaling: doubling B halves the steps (slope −1), so examples stay constant.
        if column == tables.STEPS:
            perfect = first[column] * first["batch_size"] / grid
        else:
            perfect = np.full(grid.size, first[column])
        ax.plot(grid, perfect, color=style.REFERENCE_COLOR, ls=":", lw=1.2, label="perfect scaling")
        if fit is not None:
            curve = fit.steps(grid) if column == tables.STEPS else fit.samples(grid)
            floor = fit.s_min if column == tables.STEPS else fit.e_min
            name = "S(B) = S_min(1 + B_crit/B)" if column == tables.STEPS else "E(B) = E_min(1 + B/B_crit)"
            ax.plot(grid, curve, color=style.FIT_COLOR, lw=1.6, label=f"fit {name}")
            ax.axhline(floor, color=style.FIT_COLOR, ls=":", lw=0.8, alpha=0.7)
            b_crit_band(ax, fit, vertical=True)
        else:
            ax.text(
                0.03,
                0.04,
                "B_crit not fitted: need ≥ 3 runs\nover ≥ 2 batch sizes at the target",
                transform=ax.transAxes,
                fontsize=8,
                color=style.EMPTY_COLOR,
                bbox=style.NOTE_BOX,
            )
        batch_axis(ax, shown["batch_size"])
        ax.set_yscale("log")
        ax.set_ylabel(y_label)
        ax.set_title(f"{title} (fastest lr per B)")
        ax.legend(loc="best")
    return fig


def b_crit_progress(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    """B_crit refitted to the trials completed so far, against the compute they had spent."""
    fig, axes = style.figure(1)
    ax, progress = axes[0], result.b_crit_progress
    title = "B_crit as the sweep went on"
    if progress.empty:
        style.empty_panel(ax, title, "Not fitted.\n" + result.b_crit_progress_note)
        return fig
    compute = progress["compute"].to_numpy(dtype=float)
    b_crit = progress["b_crit"].to_numpy(dtype=float)
    low, high = progress["b_crit_low"].to_numpy(dtype=float), progress["b_crit_high"].to_numpy(dtype=float)
    final = progress.iloc[-1]
    ax.axhspan(final["b_crit_low"], final["b_crit_high"], color=style.FIT_COLOR, alpha=0.10, lw=0)
    final_label = f"final: {number(final['b_crit'])} [{interval(final['b_crit_low'], final['b_crit_high'])}]"
    ax.axhline(final["b_crit"], color=style.FIT_COLOR, ls="--", lw=1.0, label=final_label)
    edge = progress["at_edge"].to_numpy(dtype=bool)
    for shown, face, label in ((~edge, style.FIT_COLOR, "B_crit, 95% interval"), (edge, "white", "not identified")):
        if shown.any():
            errors = [b_crit[shown] - low[shown], high[shown] - b_crit[shown]]
            ax.errorbar(compute[shown], b_crit[shown], yerr=errors, fmt="o", color=style.FIT_COLOR, mfc=face,
                        capsize=3, lw=1.2, label=label)  # fmt: skip
    for x, y, n in zip(compute, high, progress["trials"], strict=True):
        ax.annotate(f"{int(n)}", (x, y), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7,
                    color=style.EMPTY_COLOR)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    if compute.size == 1:
        ax.set_xlim(compute[0] / 2, compute[0] * 2)
    ax.set_xlabel("compute spent [examples processed: Σ steps × B]")
    ax.set_ylabel("B_crit [examples]")
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


# --- 3. gradient noise scale -------------------------------------------------------------------


def noise_scale(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(2)
    history, summary = sweep.history, result.noise_scale
    title_steps, title_loss = "Noise scale B_simple over training", "Noise scale vs validation loss"
    if summary is None:
        for ax, title in zip(axes, (title_steps, title_loss), strict=True):
            style.empty_panel(ax, title, "Not enough data:\n" + textwrap.fill(result.noise_note, 48))
        return fig
    run_ids = [r for runs in result.best_runs.values() for r in runs]
    windows = noise.over_training(noise.measurements(history, run_ids), summary.window)
    # Bounded windows are drawn with their interval; where the mean |G|² cannot be told from 0,
    # only a lower bound (▲); windows that bound nothing are left out.
    bounded = windows[np.isfinite(windows["high"].to_numpy(dtype=float)) & (windows["low"] > 0)]
    floors = windows[~np.isfinite(windows["high"].to_numpy(dtype=float)) & (windows["low"] > 0)]

    ax = axes[0]
    for (_, b), run in bounded.groupby(["run_id", "batch_size"], observed=True):
        run = run.sort_values("step")
        ax.plot(run["step"], run["b_simple"], color=colors(float(b)), lw=1.4, marker="o", ms=2.5)
        ax.fill_between(run["step"], run["low"], run["high"], color=colors(float(b)), alpha=0.18, lw=0)
    for b, run in floors.groupby("batch_size", observed=True):
        ax.scatter(run["step"], run["low"], marker="^", s=22, color=colors(float(b)), alpha=0.8, zorder=3)
    b_crit_band(ax, result.critical_batch, vertical=False)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps (end of each window)")
    ax.set_ylabel("B_simple [examples], 95% interval")
    ax.set_title(f"{title_steps} (windows of {number(summary.window)} steps)")
    if result.critical_batch is not None:
        ax.legend(loc="lower right")

    ax = axes[1]
    val = history[(history["key"] == "val/loss") & history["run_id"].isin(run_ids)][["run_id", "step", "value"]]
    val = val.rename(columns={"value": "val_loss"}).astype({"run_id": str})
    paired = bounded.astype({"run_id": str}).merge(val, on=["run_id", "step"])
    paired = paired[np.isfinite(paired["val_loss"].to_numpy(dtype=float))]
    if paired.empty:
        note = "Not enough data: no bounded window ends\nat a 'val/loss' evaluation."
        style.empty_panel(ax, title_loss, note)
        return fig
    for b, group in paired.groupby("batch_size", observed=True):
        errors = np.stack([group["b_simple"] - group["low"], group["high"] - group["b_simple"]])
        ax.errorbar(group["val_loss"], group["b_simple"], yerr=np.clip(errors, 0, None), fmt="o", ms=3,
                    alpha=0.7, lw=0.8, color=colors(float(b)))  # fmt: skip
    b_crit_band(ax, result.critical_batch, vertical=False)
    ax.set_yscale("log")
    ax.invert_xaxis()  # training moves to lower loss: read left to right
    ax.set_xlabel("validation loss (training proceeds →)")
    ax.set_ylabel("B_simple [examples], 95% interval")
    ax.set_title(title_loss)
    return fig

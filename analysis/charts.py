"""The report's charts, everything against batch size. One function per chart; each draws a
labelled "not enough data" panel for whatever is missing instead of failing."""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from batchscope.analysis import noise, style, tables
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.fits import CriticalBatchFit
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors, ImageFormat
from batchscope.analysis.text import interval, number

BATCH_LABEL = "batch size B [examples]"
MAX_CURVE_POINTS = 300  # per line: long histories are thinned before plotting
NO_BEST_LR = "no completed trial with a batch size, a learning rate and an objective value."


@dataclass(frozen=True)
class Chart:
    name: str  # file stem, also the HTML anchor
    title: str
    caption: str
    image: bytes
    image_format: ImageFormat

    @property
    def mime(self) -> str:
        return style.MIME[self.image_format]


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    caption: str
    draw: Callable[[SweepData, SweepAnalysis, BatchColors], Figure]
    # Drawn only when this holds (charts of optional data, e.g. inference throughput).
    when: Callable[[SweepData], bool] | None = None
    # The batch-size colour legend in the header; off for a chart that does not colour by batch size.
    batch_legend: bool = True


# --- helpers ----------------------------------------------------------------------------------


def _batch_axis(ax: Axes, batch_sizes: Sequence[float]) -> None:
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


def _log_if_spread(ax: Axes, values: np.ndarray, axis: str = "y", factor: float = 10.0) -> None:
    """Log scale when the positive values span more than `factor`."""
    values = values[np.isfinite(values)]
    if values.size and (values > 0).all() and values.max() / values.min() > factor:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _b_crit_band(ax: Axes, fit: CriticalBatchFit | None, *, vertical: bool) -> None:
    if fit is None:
        return
    label = f"B_crit = {number(fit.b_crit)} [{interval(fit.b_crit_low, fit.b_crit_high)}]"
    span, line = (ax.axvspan, ax.axvline) if vertical else (ax.axhspan, ax.axhline)
    span(fit.b_crit_low, fit.b_crit_high, color=style.FIT_COLOR, alpha=0.10, lw=0)
    line(fit.b_crit, color=style.FIT_COLOR, ls="--", lw=1.2, label=label)


def _finite(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    present = [c for c in columns if c in frame]
    if len(present) < len(columns):
        return frame.iloc[:0]
    mask = np.ones(len(frame), dtype=bool)
    for column in columns:
        mask &= np.isfinite(pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float))
    return frame[mask]


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
                _log_if_spread(ax, np.concatenate([c[x].to_numpy() for c in curves.values()]), axis="x", factor=20)
            else:
                ax.set_xscale(x_scale)
            _log_if_spread(ax, np.concatenate([c["mean"].to_numpy() for c in curves.values()]), factor=3)
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
        shown = _finite(points, "batch_size", column)
        if shown.empty:
            n_runs = int(sweep.trials["run_id"].notna().sum())
            style.empty_panel(
                ax, title, f"No run reached the target ({n_runs} run{'s' * (n_runs != 1)}):\nnothing to plot."
            )
            continue
        ax.scatter(
            shown["batch_size"],
            shown[column],
            s=14,
            alpha=0.5,
            c=[colors(b) for b in shown["batch_size"]],
            zorder=3,
        )
        means = _finite(fastest, "batch_size", column)
        ax.plot(means["batch_size"], means[column], color="0.3", lw=1, zorder=2)
        ax.scatter(
            means["batch_size"],
            means[column],
            s=60,
            edgecolor="white",
            c=[colors(b) for b in means["batch_size"]],
            zorder=4,
            label="fastest lr (mean)",
        )
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
            _b_crit_band(ax, fit, vertical=True)
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
        _batch_axis(ax, shown["batch_size"])
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
    _b_crit_band(ax, result.critical_batch, vertical=False)
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
    _b_crit_band(ax, result.critical_batch, vertical=False)
    ax.set_yscale("log")
    ax.invert_xaxis()  # training moves to lower loss: read left to right
    ax.set_xlabel("validation loss (training proceeds →)")
    ax.set_ylabel("B_simple [examples], 95% interval")
    ax.set_title(title_loss)
    return fig


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
    summary = _finite(result.trial_summary, "batch_size", "lr")
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
    _batch_axis(ax, summary["batch_size"])
    ax.set_yscale("log")
    ax.set_ylabel("learning rate" if result.lr_rule == "none" else f"effective lr ({result.lr_rule} scaling)")
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


def _memory_label(trials: pd.DataFrame) -> str:
    """What `mem/peak_mb` measured, as the trainer logged it (`memory_measure`)."""
    kinds = set(trials["memory_measure"].dropna().astype(str)) if "memory_measure" in trials else set()
    if kinds == {"cuda_max_allocated"}:
        return "peak CUDA memory allocated [MB]"
    if kinds == {"process_peak_rss"}:
        return "peak resident memory of the whole process [MB]\n(CPU: runtime and data too, not the model alone)"
    return "peak memory [MB] (CUDA: allocated; CPU: whole process)"


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
    shown = _finite(runs, "batch_size", column)
    if shown.empty:
        style.empty_panel(ax, title, f"Not enough data: no run logged\n'{column}'.")
        return
    ax.scatter(
        shown["batch_size"],
        shown[column],
        s=10,
        alpha=0.35,
        c=[colors(b) for b in shown["batch_size"]],
    )
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
    _batch_axis(ax, shown["batch_size"])
    _log_if_spread(ax, shown[column].to_numpy(dtype=float))
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
        shown = _finite(costs, "batch_size", column)
        if shown.empty:
            style.empty_panel(ax, title, f"Not enough data: no\n'{column}' measurements.")
            continue
        ax.scatter(
            shown["batch_size"],
            shown[column],
            s=12,
            alpha=0.4,
            c=[colors(b) for b in shown["batch_size"]],
        )
        medians = shown.groupby("batch_size")[column].median()
        ax.plot(
            medians.index, medians.to_numpy(), color="0.25", marker="o", markersize=4, lw=1.2, label="median over runs"
        )
        if column == "samples_per_s" and len(medians) > 1:
            b0, t0 = float(medians.index[0]), float(medians.iloc[0])
            grid = np.asarray(medians.index, dtype=float)
            ax.plot(grid, t0 * grid / b0, color=style.REFERENCE_COLOR, ls=":", label="linear in B (ideal)")
        _batch_axis(ax, shown["batch_size"])
        ax.set_yscale("log")
        ax.set_ylabel(y_label)
        ax.set_title(title)
        ax.legend(loc="best")

    ax = axes[2]
    title = "Time to target vs batch size"
    shown = _finite(result.fastest, "batch_size", tables.TIME)
    if shown.empty:
        style.empty_panel(ax, title, "No run reached the target:\nno time to target.")
        return fig
    ax.plot(shown["batch_size"], shown[tables.TIME], color="0.3", lw=1)
    ax.scatter(
        shown["batch_size"],
        shown[tables.TIME],
        s=50,
        edgecolor="white",
        zorder=3,
        c=[colors(b) for b in shown["batch_size"]],
    )
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
    _batch_axis(ax, shown["batch_size"])
    _log_if_spread(ax, shown[tables.TIME].to_numpy(dtype=float), factor=5)
    ax.set_ylabel("time to target [s]")
    ax.set_title(f"{title} (fastest lr per B)")
    ax.legend(loc="best")
    return fig


# --- 7. Optuna's view --------------------------------------------------------------------------


def optuna_view(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    fig, axes = style.figure(2)
    ax = axes[0]
    title = "Optimization history"
    done = _finite(result.trial_summary, "trial", result.score)
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
        _log_if_spread(ax, values)
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
            shown = _finite(result.fastest, "batch_size", column)
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
        _batch_axis(ax, drawn)
        ax.set_yscale("log")
        ax.set_ylabel(y_label)
        ax.set_title(title)
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


# --- registry ----------------------------------------------------------------------------------

CHARTS: tuple[_Spec, ...] = (
    _Spec(
        "convergence",
        "Convergence",
        "Validation (top) and training (bottom) loss against optimizer steps, examples seen and "
        "wall time; one line per batch size at its best learning rate (by the objective). "
        "Line: mean over seeds; band: min–max over seeds.",
        convergence,
    ),
    _Spec(
        "steps-to-target",
        "Steps and examples to target",
        "Per batch size, the learning rate that reached the target in the fewest steps (small "
        "dots: seeds; steps interpolated between the evaluations around the crossing). Dotted: "
        "perfect scaling (slope −1 for steps, flat for examples). Red: "
        "S(B) = S_min(1 + B_crit/B) and E(B) = E_min(1 + B/B_crit) fitted together "
        "(McCandlish et al. 2018), with B_crit and its 95% bootstrap interval.",
        steps_to_target,
    ),
    _Spec(
        "b-crit-progress",
        "B_crit against compute",
        "B_crit and its 95% bootstrap interval refitted as in the steps-to-target chart to the trials completed "
        "so far (a quarter of them to all; numbers: trials completed), against the examples their runs processed; "
        "band: the final interval.",
        b_crit_progress,
        batch_legend=False,
    ),
    _Spec(
        "noise-scale",
        "Gradient noise scale",
        "B_simple = tr(Σ)/|G|² at the best learning rate of each batch size, over consecutive "
        "windows of training steps (left) and against validation loss at each window's end (right): "
        "the ratio of the mean |G|² and tr Σ of every measurement in the window (negative ones "
        "included), band and bars its 95% interval (Fieller's; ▲: only a lower bound, where the mean |G|² "
        "cannot be told from 0). Red: the B_crit fitted from steps to target, "
        "which McCandlish et al. predict to be close to the noise scale.",
        noise_scale,
    ),
    _Spec(
        "lr-batch",
        "Learning rate × batch size",
        "Left: best objective per cell (learning rates binned when not on a grid; ★ best per batch "
        "size, ○ completed without reaching the target, × diverged, out of memory or failed, – pruned). "
        "Right: per batch size the lr that reached the target in the fewest steps (where 3 batch sizes "
        "reached it; else the best by the objective; the effective lr when a scaling rule is set; "
        "open rings: the best is at the edge of what was tried), McCandlish et al.'s law "
        "ε_max/(1 + B_*/B) with its knee B_* and 95% interval, and one power law for comparison.",
        lr_batch,
    ),
    _Spec(
        "generalization",
        "Generalization",
        "Final generalization gap and sharpness (top Hessian eigenvalue) against batch size: "
        "every run, and the mean ± sd at the best learning rate.",
        generalization,
    ),
    _Spec(
        "cost",
        "Cost",
        "Throughput (median per run) and peak memory against batch size, and the time to reach "
        "the target at the fastest learning rate of each batch size.",
        cost,
    ),
    _Spec(
        "optuna",
        "Optuna's view",
        "Objective of each completed trial in order (colour: batch size) with the best so far, "
        "and fANOVA parameter importances.",
        optuna_view,
    ),
    _Spec(
        "inference",
        "Inference throughput",
        "From `batchscope throughput`: examples per second against latency per forward pass at each "
        "batch size (point: median, bar: to the 95th percentile). Larger batches buy throughput with latency.",
        throughput_latency,
        when=lambda sweep: not sweep.throughput.dropna(subset=["samples_per_s"]).empty,
    ),
)


def _error_figure(title: str, error: Exception) -> Figure:
    fig, axes = style.figure(1)
    style.empty_panel(axes[0], title, f"This chart could not be drawn:\n{type(error).__name__}: {error}"[:300])
    return fig


def render_charts(
    sweep: SweepData,
    result: SweepAnalysis,
    colors: BatchColors,
    *,
    image_format: ImageFormat = "png",
    strict: bool = False,
) -> list[Chart]:
    """Every chart of one study. With strict=False a chart that raises becomes a panel saying
    so (one bad chart should not cost the whole report); tests use strict=True."""
    charts = []
    # Charts colour by batch size; one legend per figure, in its header.
    legend = colors.legend_handles(sweep.trials["batch_size"].dropna())
    for spec in CHARTS:
        if spec.when is not None and not spec.when(sweep):
            continue
        try:
            fig = spec.draw(sweep, result, colors)
        except Exception as error:
            if strict:
                raise
            warnings.warn(f"chart {spec.name!r} failed: {error!r}", stacklevel=2)
            fig = _error_figure(spec.title, error)
        handles = legend if spec.batch_legend else None
        image = style.to_bytes(fig, image_format, title=spec.title, legend_handles=handles)
        charts.append(Chart(spec.name, spec.title, spec.caption, image, image_format))
    return charts


def render_comparison(studies: Sequence[tuple[str, SweepAnalysis]], *, image_format: ImageFormat = "png") -> Chart:
    fig = comparison(studies)
    return Chart(
        "comparison",
        "Comparison",
        "Steps and time to target at the fastest learning rate of each batch size, one line per study.",
        style.to_bytes(fig, image_format, title="Comparison"),
        image_format,
    )

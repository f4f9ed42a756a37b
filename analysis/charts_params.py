"""The searched hyperparameters besides batch size and lr (`search.params`): their best value per batch size."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchscope.analysis import style
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.chart_parts import BATCH_LABEL, batch_axis, batch_scatter
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors

# What `suggest` samples in every sweep; the rest are `search.params`.
_ALWAYS = ("batch_size", "lr")
_PANELS_PER_ROW = 3


def searched_params(sweep: SweepData) -> dict[str, optuna.distributions.BaseDistribution]:
    """The study's parameters besides batch size and lr, in the order trials first had them."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in sweep.study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            if name not in _ALWAYS and name not in out:
                out[name] = distribution
    return out


def params_chart(sweep: SweepData, result: SweepAnalysis, colors: BatchColors) -> Figure:
    params = searched_params(sweep)
    n = max(1, len(params))
    fig, axes = style.figure(n, rows=int(np.ceil(n / _PANELS_PER_ROW)))
    values = _trial_values(sweep, params)
    best = best_values(result, values)
    for ax, (name, distribution) in zip(axes, params.items(), strict=False):
        _panel(ax, name, distribution, values, best, result, colors)
    for ax in axes[len(params) :]:
        ax.set_visible(False)
    return fig


def best_values(result: SweepAnalysis, values: pd.DataFrame) -> pd.DataFrame:
    """Per batch size, its best trial by the objective (`result.best_lr`) with that trial's values."""
    return result.best_lr[["batch_size", "trial"]].merge(values.drop(columns="batch_size"), on="trial", how="left")


def trial_values(sweep: SweepData) -> pd.DataFrame:
    """Every completed trial's batch size and `search.params` values (see `_trial_values`)."""
    return _trial_values(sweep, searched_params(sweep))


def _trial_values(sweep: SweepData, params: dict[str, optuna.distributions.BaseDistribution]) -> pd.DataFrame:
    """trial, batch_size, each searched param (Optuna's value; a choice's index for categoricals of text),
    and `effective_<name>` where the trainer scaled it with the batch size (mean over seeds)."""
    rows = []
    for t in sweep.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "batch_size" not in t.params:
            continue
        row: dict[str, float] = {"trial": t.number, "batch_size": int(t.params["batch_size"])}
        for name, distribution in params.items():
            if name in t.params:
                value = t.params[name]
                row[name] = distribution.to_internal_repr(value) if _labelled(distribution) else value
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["trial", "batch_size", *params])
    effective = [f"effective_{name}" for name in params if f"effective_{name}" in sweep.trials]
    if effective:
        means = sweep.trials.groupby("trial")[effective].mean().reset_index()
        frame = frame.merge(means, on="trial", how="left")
    return frame


def _labelled(distribution: optuna.distributions.BaseDistribution) -> bool:
    """A categorical of other things than numbers: drawn at the choices' positions, labelled."""
    if not isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return False
    return not all(isinstance(c, int | float) and not isinstance(c, bool) for c in distribution.choices)


def _panel(
    ax: Axes,
    name: str,
    distribution: optuna.distributions.BaseDistribution,
    values: pd.DataFrame,
    best: pd.DataFrame,
    result: SweepAnalysis,
    colors: BatchColors,
) -> None:
    title = f"Best {name} vs batch size"
    tried = values.dropna(subset=[name])
    chosen = best.dropna(subset=[name]).sort_values("batch_size")
    if chosen.empty:
        style.empty_panel(ax, title, f"Not enough data: no completed trial has {name}.")
        return
    ax.scatter(tried["batch_size"], tried[name], s=10, color="0.75", label="tried", zorder=2)
    ax.plot(chosen["batch_size"], chosen[name], color="0.4", lw=1, zorder=3)
    batch_scatter(ax, chosen, name, colors, s=60, edgecolor="white", zorder=4, label=f"best ({result.score_label})")
    effective = f"effective_{name}"
    if effective in chosen and chosen[effective].notna().any():
        ax.plot(chosen["batch_size"], chosen[effective], "s--", color=style.FIT_COLOR, ms=4, lw=1,
                label="as trained (scaled with the batch size)", zorder=3)  # fmt: skip
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        choices = distribution.choices
        where = np.arange(len(choices)) if _labelled(distribution) else np.asarray(choices, dtype=float)
        ax.set_yticks(where, [str(c) for c in choices])
    else:
        _numeric_axis(ax, tried[name].to_numpy(dtype=float), bool(getattr(distribution, "log", False)))
    batch_axis(ax, values["batch_size"].dropna().unique())
    ax.set_xlabel(BATCH_LABEL)
    ax.set_ylabel(name)
    ax.set_title(title)
    ax.legend(fontsize=7.5, loc="best")


def _numeric_axis(ax: Axes, tried: np.ndarray, log: bool) -> None:
    """Log where the values were searched on a log scale and span a decade; a few distinct values
    (a list that was searched, e.g. beta2 in 0.95, 0.99, 0.999) are the ticks themselves."""
    positive = tried[tried > 0]
    if log and positive.size and positive.max() / positive.min() > 10:
        ax.set_yscale("log")
    distinct = np.unique(tried)
    if 1 < distinct.size <= 8:
        ax.set_yticks(distinct, [f"{v:.4g}" for v in distinct])
        ax.minorticks_off()

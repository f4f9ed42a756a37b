"""Everything the charts and findings need, computed once per sweep."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd

from analysis import tables
from analysis.fits import CriticalBatchFit, PowerLawFit, fit_critical_batch, fit_lr_exponent
from analysis.load import SweepData

NOISE_KEY = "gns/b_simple"


@dataclass(frozen=True)
class NoiseScaleSummary:
    """B_simple at the best learning rate of each batch size, in examples (median over runs)."""

    early: float  # first measurement of each run
    late: float  # median over the last quarter of each run
    low: float  # smallest per-run late value
    high: float  # largest per-run late value
    n_runs: int


@dataclass(frozen=True)
class SweepAnalysis:
    score: str  # trials column used as the objective
    score_label: str
    minimize: bool
    trial_summary: pd.DataFrame
    best_lr: pd.DataFrame  # tables.best_lr_per_batch
    best_runs: dict[int, list[str]]  # batch size -> run ids of its best-lr trial
    fastest: pd.DataFrame  # tables.fastest_to_target, per batch size
    target_points: pd.DataFrame  # the runs behind `fastest`
    critical_batch: CriticalBatchFit | None
    lr_scaling: PowerLawFit | None
    run_costs: pd.DataFrame
    noise_scale: NoiseScaleSummary | None
    importances: dict[str, float] | None
    importance_note: str  # why importances are missing, when they are
    best_trial: pd.Series | None  # row of trial_summary
    status_counts: dict[str, int]


def _score(sweep: SweepData, summary: pd.DataFrame) -> tuple[str, str, bool]:
    """The study's first objective; final val loss only when no trial has an objective value
    (no trial completed), and then labelled as such."""
    if "objective" in summary and np.isfinite(summary["objective"].to_numpy(dtype=float)).any():
        direction = "minimize" if sweep.minimize else "maximize"
        if len(sweep.directions) > 1:
            # Charts and findings rank by the first objective of a multi-objective study.
            direction += f", 1st of {len(sweep.directions)} objectives"
        return "objective", f"{sweep.objective_names[0]} ({direction})", sweep.minimize
    return "final/val_loss", "final validation loss (minimize; no trial completed with an objective)", True


def _best_runs(trials: pd.DataFrame, best_lr: pd.DataFrame) -> dict[int, list[str]]:
    runs = trials.dropna(subset=["run_id"])
    return {
        int(row.batch_size): runs.loc[runs["trial"] == row.trial, "run_id"].astype(str).tolist()
        for row in best_lr.itertuples()
    }


def _best_trial(summary: pd.DataFrame, score: str, minimize: bool) -> pd.Series | None:
    """The best completed trial by `score` (Optuna's best trial for a single objective; for several,
    the best by the first, which lies on the Pareto front). Pruned trials' values are not results."""
    if score not in summary or "state" not in summary:
        return None
    done = summary[(summary["state"] == "COMPLETE") & np.isfinite(summary[score].to_numpy(dtype=float))]
    if done.empty:
        return None
    # Ties go to the earliest trial, as in Optuna's best_trial.
    order = done.sort_values([score, "trial"], ascending=[minimize, True], kind="stable")
    return order.iloc[0]


def _noise_scale(history: pd.DataFrame, run_ids: list[str]) -> NoiseScaleSummary | None:
    rows = history[(history["key"] == NOISE_KEY) & history["run_id"].isin(run_ids)]
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype=float)) & (rows["value"] > 0)]
    if rows.empty:
        return None
    early, late = [], []
    for _, run in rows.groupby("run_id", observed=True):
        run = run.sort_values("step")
        early.append(float(run["value"].iloc[0]))
        last_quarter = run["step"] >= run["step"].min() + 0.75 * (run["step"].max() - run["step"].min())
        late.append(float(run.loc[last_quarter, "value"].median()))
    return NoiseScaleSummary(
        early=float(np.median(early)),
        late=float(np.median(late)),
        low=float(np.min(late)),
        high=float(np.max(late)),
        n_runs=len(late),
    )


def _importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"Not enough data: importances need 2 completed trials, got {len(complete)}."
    varied = [name for name in complete[0].params if len({t.params.get(name) for t in complete}) > 1]
    if not varied:
        return None, "Not enough data: no parameter varies across the completed trials."
    target = None
    if len(study.directions) > 1:

        def target(trial: optuna.trial.FrozenTrial) -> float:
            return float(trial.values[0])

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(
                study,
                # 16 shallow trees: within a few hundredths of Optuna's default forest (64
                # trees, depth 64) on our sweeps, and ~6x faster (9 s -> 1.3 s at 250 trials).
                evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=8, seed=0),
                target=target,
            )
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        return None, f"Parameter importances could not be computed: {error}"
    if not importances:
        return None, "Not enough data: no parameter importances."
    return dict(importances), ""


def analyze(sweep: SweepData) -> SweepAnalysis:
    trials = sweep.trials
    summary = tables.trial_table(trials)
    score, score_label, minimize = _score(sweep, summary)
    best_lr = tables.best_lr_per_batch(summary, score=score, minimize=minimize)
    best_runs = _best_runs(trials, best_lr)
    fastest, points = tables.fastest_to_target(trials)
    critical = None
    if not points.empty:
        critical = fit_critical_batch(
            points["batch_size"].to_numpy(dtype=float),
            points[tables.STEPS].to_numpy(dtype=float),
            samples_to_target=points[tables.SAMPLES].to_numpy(dtype=float),
        )
    lr_scaling = None
    if not best_lr.empty:
        lr_scaling = fit_lr_exponent(best_lr["batch_size"].to_numpy(dtype=float), best_lr["lr"].to_numpy(dtype=float))
    importances, importance_note = _importances(sweep.study)
    best_trial = _best_trial(summary, score, minimize)
    status_counts = trials.dropna(subset=["run_id"])["status"].value_counts().to_dict() if len(trials) else {}
    return SweepAnalysis(
        score=score,
        score_label=score_label,
        minimize=minimize,
        trial_summary=summary,
        best_lr=best_lr,
        best_runs=best_runs,
        fastest=fastest,
        target_points=points,
        critical_batch=critical,
        lr_scaling=lr_scaling,
        run_costs=tables.run_costs(sweep.history),
        noise_scale=_noise_scale(sweep.history, [r for ids in best_runs.values() for r in ids]),
        importances=importances,
        importance_note=importance_note,
        best_trial=best_trial,
        status_counts={str(k): int(v) for k, v in status_counts.items()},
    )

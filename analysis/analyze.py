"""Everything the charts and findings need, computed once per sweep."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd
from scipy import special

from batchscope.analysis import frontier, noise, tables
from batchscope.analysis._fork import Background
from batchscope.analysis.fits import (
    CriticalBatchFit,
    LrLawFit,
    PowerLawFit,
    fit_critical_batch,
    fit_lr_exponent,
    fit_lr_law,
)
from batchscope.analysis.load import SweepData
from batchscope.analysis.noise import NoiseEstimate

# A batch size whose fastest run crossed the target by its second evaluation has few points
# around the crossing: its steps to target rest on one interpolation from the start.
FEW_EVALUATIONS = 2


@dataclass(frozen=True)
class Ratio:
    """value = a/b with an approximate interval from the two estimates' log-scale errors."""

    value: float
    low: float
    high: float
    confidence: float

    @property
    def includes_one(self) -> bool:
        return self.low <= 1.0 <= self.high


@dataclass(frozen=True)
class NoiseScaleSummary:
    """B_simple (examples) read from every logged measurement (analysis.noise), pooled over runs.

    early: the first `window` steps of the best-lr runs; late: the last quarter of each of them;
    near_target: the second half of the way to the target (steps S/2 to S) of the runs that
    reached it fastest, the runs the critical batch size is fitted to; per_batch: each batch
    size's best-lr runs over their last quarter. `vs_b_crit` is B_crit / B_simple near the target.
    """

    window: float
    early: NoiseEstimate
    late: NoiseEstimate
    near_target: NoiseEstimate | None
    per_batch: dict[int, NoiseEstimate]
    vs_b_crit: Ratio | None


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
    # How steps to target were read: "interpolated" between the evaluations around the crossing,
    # or "first evaluation" (stores from before interpolation: on average half an interval late).
    target_reading: str
    few_evaluations: list[int]  # batch sizes whose fastest run crossed by its FEW_EVALUATIONS-th evaluation
    lr_scaling: PowerLawFit | None
    lr_law: LrLawFit | None
    lr_rule: str  # the sweep's lr scaling rule: the fits use the effective lr when it is not "none"
    lr_basis: str  # "fastest": the lr law is fitted to the lr fastest to the target; "objective": the best lr
    lr_column: str  # "effective_lr" under a scaling rule, else "lr": what the lr law is fitted to
    lr_points: pd.DataFrame  # batch_size, trial, lr (base), fitted_lr (of lr_column): the law's points
    lr_brackets: pd.DataFrame  # frontier.lr_brackets of lr_points: the lrs tried around each one
    lr_edges: dict[int, str]  # batch size -> "lowest" / "highest" / "only": best lr not bracketed
    run_costs: pd.DataFrame
    b_crit_progress: pd.DataFrame  # frontier.b_crit_progress: B_crit refitted as trials completed
    b_crit_progress_note: str  # why b_crit_progress is empty, when it is
    noise_scale: NoiseScaleSummary | None
    noise_note: str  # why noise_scale is missing, when it is
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


def _run_ids_of(trials: pd.DataFrame, points: pd.DataFrame) -> dict[str, float]:
    """Run id -> steps to target, for the (trial, seed) rows of `points`."""
    if points.empty:
        return {}
    runs = trials.dropna(subset=["run_id"])[["trial", "seed", "run_id"]].merge(
        points[["trial", "seed", tables.STEPS]], on=["trial", "seed"]
    )
    return {str(r): float(s) for r, s in zip(runs["run_id"], runs[tables.STEPS], strict=True)}


def ratio_interval(
    numerator: float, log_se_numerator: float, denominator: float, log_se_denominator: float, confidence: float
) -> Ratio | None:
    """numerator/denominator with a normal interval on the log scale (independent errors)."""
    if not (numerator > 0 and denominator > 0 and math.isfinite(log_se_numerator + log_se_denominator)):
        return None
    z = float(special.ndtri((1 + confidence) / 2))  # the normal quantile, as stats.norm.ppf
    value = numerator / denominator
    half = z * math.hypot(log_se_numerator, log_se_denominator)
    return Ratio(value, value * math.exp(-half), value * math.exp(half), confidence)


def _vs_b_crit(fit: CriticalBatchFit | None, near: NoiseEstimate | None) -> Ratio | None:
    """B_crit / B_simple near the target. Where B_simple has only a lower bound (its mean |G|²
    is not clear of 0), so does nothing else: the ratio gets only an upper bound (value NaN)."""
    if fit is None or near is None or fit.at_search_edge:
        return None
    if not near.bounded and math.isfinite(near.low) and near.low > 0:
        return Ratio(math.nan, 0.0, fit.b_crit_high / near.low, fit.confidence)
    if not near.bounded:
        return None
    # The bootstrap interval of B_crit as a log-scale standard error (it is roughly symmetric in log B).
    z = float(special.ndtri((1 + fit.confidence) / 2))
    log_se = (math.log(fit.b_crit_high) - math.log(fit.b_crit_low)) / (2 * z)
    return ratio_interval(fit.b_crit, log_se, near.b_simple, near.log_stderr(), fit.confidence)


def _noise_scale(
    sweep: SweepData, best_runs: dict[int, list[str]], points: pd.DataFrame, fit: CriticalBatchFit | None
) -> tuple[NoiseScaleSummary | None, str]:
    recorded = noise.recorded(sweep.trials)
    all_best = [r for runs in best_runs.values() for r in runs]
    raw = noise.measurements(sweep.history, [r for r in all_best if r in recorded])
    if raw.empty:
        if not noise.measurements(sweep.history, all_best).empty:
            return None, (
                "This sweep was recorded before batchscope logged each noise-scale measurement: its smoothed "
                "values carry no uncertainty, so no noise scale is reported."
            )
        return None, "No gradient noise scale was measured at the best learning rates."
    best = list(raw["run_id"].unique())
    window = noise.window_of(sweep.trials, best) or float(raw["step"].max())
    last = raw.groupby("run_id")["step"].transform("max")
    late = raw[raw["step"] > 0.75 * last]
    near = None
    to_target = {r: s for r, s in _run_ids_of(sweep.trials, points).items() if r in recorded}
    if to_target:
        fastest = noise.measurements(sweep.history, list(to_target))
        near = noise.estimate(noise.between(fastest, {r: (s / 2, s) for r, s in to_target.items()}))
    per_batch = {int(b): noise.estimate(late[late["batch_size"] == b]) for b in sorted(late["batch_size"].unique())}
    summary = NoiseScaleSummary(
        window=window,
        early=noise.estimate(raw[raw["step"] <= window]),
        late=noise.estimate(late),
        near_target=near,
        per_batch=per_batch,
        vs_b_crit=_vs_b_crit(fit, near),
    )
    return summary, ""


def _few_evaluations(trials: pd.DataFrame, points: pd.DataFrame) -> list[int]:
    """Batch sizes whose fastest runs crossed the target by their FEW_EVALUATIONS-th evaluation."""
    if points.empty or "eval_every" not in trials or "final/steps_to_target_high" not in trials:
        return []
    runs = trials.dropna(subset=["run_id"]).merge(points[["trial", "seed"]], on=["trial", "seed"])
    evals = runs["final/steps_to_target_high"] / pd.to_numeric(runs["eval_every"], errors="coerce")
    return sorted({int(b) for b, n in zip(runs["batch_size"], evals, strict=True) if n <= FEW_EVALUATIONS})


def _lr_column(summary: pd.DataFrame) -> tuple[str, str]:
    """("effective_lr", rule) when a scaling rule sets the lr from the batch size, else ("lr", "none")."""
    rules = summary["lr_scaling"].dropna().astype(str).unique() if "lr_scaling" in summary else []
    rule = rules[0] if len(rules) == 1 else "none"
    if rule != "none" and "effective_lr" in summary and summary["effective_lr"].notna().any():
        return "effective_lr", rule
    return "lr", "none"


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
    # fANOVA (mostly sklearn's import) in a forked child while the rest is analysed (see _fork).
    importances = Background(lambda: _importances(sweep.study))
    try:
        return _analyze(sweep, importances)
    finally:
        importances.discard()


def _analyze(sweep: SweepData, pending_importances: Background[tuple[dict[str, float] | None, str]]) -> SweepAnalysis:
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
    lr_column, lr_rule = _lr_column(summary)
    # The lr law is about the lr that makes the most progress per step (McCandlish et al.'s ε_opt):
    # the one that reached the target fastest, where 3 batch sizes reached it; else the best by the objective.
    lr_basis = "fastest" if fastest["batch_size"].nunique() >= 3 else "objective"
    chosen = fastest if lr_basis == "fastest" else best_lr
    lr_points = chosen[["batch_size", "trial", "lr"]].reset_index(drop=True)
    lr_points["fitted_lr"] = summary.set_index("trial")[lr_column].reindex(lr_points["trial"]).to_numpy(dtype=float)
    lr_scaling = lr_law = None
    if not lr_points.empty:
        batch_sizes = lr_points["batch_size"].to_numpy(dtype=float)
        lr_scaling = fit_lr_exponent(batch_sizes, lr_points["fitted_lr"].to_numpy())
        lr_law = fit_lr_law(batch_sizes, lr_points["fitted_lr"].to_numpy())
    brackets = frontier.lr_brackets(summary, lr_points)
    progress, progress_note = frontier.b_crit_progress(trials, sweep.history)
    noise_summary, noise_note = _noise_scale(sweep, best_runs, points, critical)
    importances, importance_note = pending_importances.result()
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
        target_reading="interpolated" if "final/steps_to_target_low" in trials else "first evaluation",
        few_evaluations=_few_evaluations(trials, points),
        lr_scaling=lr_scaling,
        lr_law=lr_law,
        lr_rule=lr_rule,
        lr_basis=lr_basis,
        lr_column=lr_column,
        lr_points=lr_points,
        lr_brackets=brackets,
        lr_edges={
            int(b): kind
            for b, kind in zip(brackets["batch_size"], brackets["kind"], strict=True)
            if kind in frontier.UNBRACKETED
        },
        run_costs=tables.run_costs(sweep.history),
        b_crit_progress=progress,
        b_crit_progress_note=progress_note,
        noise_scale=noise_summary,
        noise_note=noise_note,
        importances=importances,
        importance_note=importance_note,
        best_trial=best_trial,
        status_counts={str(k): int(v) for k, v in status_counts.items()},
    )

"""Tables derived from a loaded sweep: per trial, per batch size, per run, and seed-averaged
curves. Plain pandas in, plain pandas out; charts and findings read these."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

STEPS = "final/steps_to_target"
SAMPLES = "final/samples_to_target"
TIME = "final/time_to_target_s"
CURVE_COLUMNS = ["step", "samples", "time_s", "mean", "low", "high", "n_runs"]


def trial_table(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per Optuna trial: the mean over its seeds of every numeric column, the first
    value of every text column, and `n_runs`."""
    if trials.empty:
        return trials.assign(n_runs=pd.Series(dtype=int))
    numeric = [c for c in trials.select_dtypes("number").columns if c != "trial"]
    text = [c for c in trials.columns if c not in numeric and c != "trial"]
    grouped = trials.groupby("trial", sort=True)
    table = grouped[numeric].mean()
    table[text] = grouped[text].first()
    table["n_runs"] = grouped["run_id"].count()
    table["batch_size"] = table["batch_size"].round().astype("Int64")
    return table.reset_index()


def best_lr_per_batch(trial_summary: pd.DataFrame, *, score: str = "objective", minimize: bool = True) -> pd.DataFrame:
    """Per batch size, the trial with the best `score` (among completed trials when the score is
    Optuna's objective).

    Columns: batch_size, lr, trial, score, n_trials (completed trials at that batch size).
    """
    columns = ["batch_size", "lr", "trial", "score", "n_trials"]
    if score not in trial_summary or trial_summary.empty:
        return pd.DataFrame(columns=columns)
    done = trial_summary[np.isfinite(trial_summary[score].to_numpy(dtype=float))]
    if score == "objective" and "state" in done:
        # Optuna's value of a pruned trial is an intermediate value, not a result.
        done = done[done["state"].fillna("COMPLETE") == "COMPLETE"]
    done = done.dropna(subset=["batch_size", "lr"])
    if done.empty:
        return pd.DataFrame(columns=columns)
    order = done.sort_values(score, ascending=minimize, kind="stable")
    best = order.groupby("batch_size", sort=True).head(1).sort_values("batch_size")
    out = best[["batch_size", "lr", "trial", score]].rename(columns={score: "score"})
    out["n_trials"] = done.groupby("batch_size")["trial"].count().reindex(out["batch_size"]).values
    return out.reset_index(drop=True)


def fastest_to_target(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per batch size, the learning rate that reached the target in the fewest steps.

    As in Shallue et al. 2019, steps to result for a batch size are those of its best-tuned
    trial. A trial counts only if every one of its runs reached the target (a mean over the
    seeds that made it would flatter a learning rate that is often too slow).

    Returns (per_batch, points): per_batch has batch_size, trial, lr and the seed means of
    steps/samples/time to target; points has one row per run of those trials (for fits).
    """
    per_batch_columns = ["batch_size", "trial", "lr", STEPS, SAMPLES, TIME, "n_runs"]
    point_columns = ["batch_size", "trial", "seed", "lr", STEPS, SAMPLES, TIME]
    if STEPS not in trials or trials.empty:
        return pd.DataFrame(columns=per_batch_columns), pd.DataFrame(columns=point_columns)
    runs = trials.dropna(subset=["run_id", "batch_size"]).copy()
    for column in (SAMPLES, TIME):
        if column not in runs:
            runs[column] = np.nan
    # Whether each trial's runs all reached it: one grouped reduction (a Python call per trial took
    # a tenth of a 500-trial report).
    finite = pd.Series(np.isfinite(runs[STEPS].to_numpy(dtype=float)), index=runs.index)
    reached = finite.groupby(runs["trial"]).all()
    runs = runs[runs["trial"].map(reached).fillna(False).astype(bool)]
    if runs.empty:
        return pd.DataFrame(columns=per_batch_columns), pd.DataFrame(columns=point_columns)
    by_trial = runs.groupby("trial").agg(
        batch_size=("batch_size", "first"),
        lr=("lr", "first"),
        steps=(STEPS, "mean"),
        samples=(SAMPLES, "mean"),
        time=(TIME, "mean"),
        n_runs=("run_id", "count"),
    )
    by_trial = by_trial.rename(columns={"steps": STEPS, "samples": SAMPLES, "time": TIME})
    best = by_trial.sort_values(STEPS, kind="stable").groupby("batch_size").head(1)
    per_batch = best.reset_index().sort_values("batch_size")[per_batch_columns]
    points = runs[runs["trial"].isin(per_batch["trial"])][point_columns]
    return per_batch.reset_index(drop=True), points.reset_index(drop=True)


def run_costs(history: pd.DataFrame) -> pd.DataFrame:
    """Per run: batch size, median throughput and step time, peak memory, and how much the step
    time varied between the run's evaluation windows (its coefficient of variation: how far one
    run's wall-clock times can be trusted on a shared machine)."""
    columns = ["run_id", "batch_size", "samples_per_s", "step_time_ms", "peak_mb", "step_time_cv"]
    keys = {
        "perf/samples_per_s": "samples_per_s",
        "perf/step_time_ms": "step_time_ms",
        "mem/peak_mb": "peak_mb",
    }
    rows = history[history["key"].isin(keys.keys())]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    # Medians, because the first measurements include warm-up and compilation.
    table = rows.pivot_table(
        index=["run_id", "batch_size"],
        columns="key",
        values="value",
        aggfunc="median",
        observed=True,
    )
    if "mem/peak_mb" in table:
        peak = rows[rows["key"] == "mem/peak_mb"].groupby(["run_id", "batch_size"], observed=True)
        table["mem/peak_mb"] = peak["value"].max()
    if "perf/step_time_ms" in table:
        times = rows[rows["key"] == "perf/step_time_ms"].groupby(["run_id", "batch_size"], observed=True)["value"]
        table["step_time_cv"] = times.std() / times.mean()
    table = table.rename(columns=keys).reset_index()
    for column in columns:
        if column not in table:
            table[column] = np.nan
    return table[columns]


def seed_curve(history: pd.DataFrame, run_ids: Iterable[str], key: str, *, max_points: int = 300) -> pd.DataFrame:
    """Mean, min and max over the given runs (seeds of one configuration) of one metric, by
    step, thinned to at most `max_points` by averaging within log-spaced step bins."""
    run_ids = list(run_ids)
    rows = history[(history["key"] == key) & history["run_id"].isin(run_ids)]
    rows = rows[np.isfinite(rows["value"].to_numpy(dtype=float))]
    if rows.empty:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    steps, values, times = _by_step_and_run(rows)
    batch_size = float(rows["batch_size"].iloc[0])
    curve = pd.DataFrame(
        {
            "step": steps.astype(float),
            "time_s": times.mean(axis=1).to_numpy(),
            "mean": values.mean(axis=1).to_numpy(),
            "low": values.min(axis=1).to_numpy(),
            "high": values.max(axis=1).to_numpy(),
            "n_runs": values.notna().sum(axis=1).to_numpy(),
        }
    )
    if len(curve) > max_points:
        edges = np.geomspace(curve["step"].min() + 1, curve["step"].max() + 1, max_points + 1)
        bins = np.clip(np.searchsorted(edges, curve["step"] + 1, side="right") - 1, 0, max_points)
        curve = curve.groupby(bins).mean()
    curve["samples"] = curve["step"] * batch_size
    return curve[CURVE_COLUMNS].reset_index(drop=True)


def _by_step_and_run(rows: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """The sorted steps, and `value` and `time_s` as step × run tables (NaN where a run has no
    value at a step; a step logged twice keeps its last value): what pivot_table(aggfunc="last")
    gives for these finite values, built with numpy (pivot_table's groupby took a third of the
    convergence chart's time)."""
    step_values, step_index = np.unique(rows["step"].to_numpy(), return_inverse=True)
    _, run_index = np.unique(rows["run_id"].astype(str).to_numpy(), return_inverse=True)
    n_runs = int(run_index.max()) + 1
    cell = step_index * n_runs + run_index
    # The last row of each (step, run): the first of the reversed cells.
    _, first_reversed = np.unique(cell[::-1], return_index=True)
    last = cell.size - 1 - first_reversed
    tables = []
    for column in ("value", "time_s"):
        table = np.full(step_values.size * n_runs, np.nan)
        table[cell[last]] = rows[column].to_numpy(dtype=float)[last]
        tables.append(pd.DataFrame(table.reshape(step_values.size, n_runs)))
    return step_values, tables[0], tables[1]

"""The frontier as it stands, for any sweep: per batch size, whether the lrs tried around its
best lr bracket the optimum, and how B_crit's interval narrowed as trials completed, against
the compute they spent (examples processed: Σ steps × batch size over their runs).

Plain pandas in, plain pandas out; the report's per-batch table, findings and charts read these.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from batchscope.analysis import tables
from batchscope.analysis.fits import fit_critical_batch
from batchscope.analysis.text import number

# Bracket kinds. "diverged above": the nearest lr above the best diverged; the optimum lies below
# it, so it is bracketed (as the frontier sampler counts it), but it may sit right at the cliff.
BRACKETED, DIVERGED_ABOVE, LOWEST, HIGHEST, ONLY = "bracketed", "diverged above", "lowest", "highest", "only"
UNBRACKETED = (LOWEST, HIGHEST, ONLY)
BRACKET_COLUMNS = ["batch_size", "trial", "lr", "lr_below", "lr_above", "kind"]
# Trials that trained say something about the lr; a crash or an out-of-memory says nothing.
_TRAINED = ("ok", "pruned", "diverged")
_SAME_LR = 1e-9  # relative: lrs closer than this are one lr tried twice

PROGRESS_COLUMNS = ["trials", "runs", "compute", "n_batch_sizes", "b_crit", "b_crit_low", "b_crit_high", "at_edge"]
MIN_BATCH_SIZES = 3  # a checkpoint is fitted once this many batch sizes have a finite best


def lr_brackets(trial_summary: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """Per batch size of `chosen` (batch_size, trial, lr: its best or fastest lr), the nearest lr
    tried below and above it there, and the bracket's kind (BRACKETED, DIVERGED_ABOVE, LOWEST,
    HIGHEST or ONLY). Every trial that trained counts as tried, a diverged one included."""
    if chosen.empty:
        return pd.DataFrame(columns=BRACKET_COLUMNS)
    tried = trial_summary.dropna(subset=["batch_size", "lr"])
    if "status" in tried:
        tried = tried[tried["status"].isin(_TRAINED)]
    rows = []
    for row in chosen.itertuples():
        here = tried[tried["batch_size"] == row.batch_size]
        lrs = here["lr"].to_numpy(dtype=float)
        diverged = (here["status"] == "diverged").to_numpy() if "status" in here else np.zeros(lrs.size, bool)
        best = float(row.lr)
        below = lrs < best * (1 - _SAME_LR)
        above = lrs > best * (1 + _SAME_LR)
        lr_below = float(lrs[below].max()) if below.any() else math.nan
        lr_above = float(lrs[above].min()) if above.any() else math.nan
        if not below.any() and not above.any():
            kind = ONLY
        elif not below.any():
            kind = LOWEST
        elif not above.any():
            kind = HIGHEST
        else:
            # Several trials at the upper neighbour: one that did not diverge is a measured worse value.
            at_above = np.isclose(lrs, lr_above, rtol=_SAME_LR, atol=0)
            kind = DIVERGED_ABOVE if diverged[at_above].all() else BRACKETED
        rows.append((int(row.batch_size), int(row.trial), best, lr_below, lr_above, kind))
    return pd.DataFrame(rows, columns=BRACKET_COLUMNS)


def bracket_text(kind: str, lr: float, lr_below: float, lr_above: float) -> str:
    """The per-batch table's "lr bracket" cell: where the optimum lies, as far as the trials tell."""
    if kind == ONLY:
        return f"{number(lr)} only"
    if kind == LOWEST:
        return f"≤ {number(lr)} (edge)"
    if kind == HIGHEST:
        return f"≥ {number(lr)} (edge)"
    text = f"{number(lr_below)} – {number(lr_above)}"
    return text + " (diverged above)" if kind == DIVERGED_ABOVE else text


# --- B_crit against compute --------------------------------------------------------------------


def _completion_order(runs: pd.DataFrame) -> list[int]:
    """Trial numbers in the order they completed: the end of their last run (MLflow's end_time),
    trial number for ties and for trials whose runs have no end time (still running, old stores)."""
    if "end_time" in runs:
        end = pd.to_numeric(runs["end_time"], errors="coerce")
    else:
        end = pd.Series(np.nan, index=runs.index)
    finished = end.groupby(runs["trial"]).max()
    order = pd.DataFrame({"trial": finished.index, "end": finished.to_numpy(dtype=float)})
    order["end"] = order["end"].fillna(math.inf)
    return [int(t) for t in order.sort_values(["end", "trial"], kind="stable")["trial"]]


def run_compute(runs: pd.DataFrame, history: pd.DataFrame) -> pd.Series:
    """Examples each run processed: its last logged step × its (effective) batch size. A run with
    no logged step counts its max_steps where that param is known, else nothing."""
    last_step = history.groupby("run_id", observed=True)["step"].max() if not history.empty else pd.Series()
    steps = runs["run_id"].map(last_step).astype(float)
    if "max_steps" in runs:
        steps = steps.fillna(pd.to_numeric(runs["max_steps"], errors="coerce"))
    return (steps.fillna(0.0) * runs["batch_size"].astype(float)).rename("compute")


def b_crit_progress(
    trials: pd.DataFrame,
    history: pd.DataFrame,
    *,
    checkpoints: int = 10,
    first: float = 0.25,
    n_bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[pd.DataFrame, str]:
    """B_crit and its bootstrap interval fitted to the trials completed so far, at `checkpoints`
    evenly spaced shares of the trials from `first` to all of them, with the compute spent by then.

    Fitted as the report fits it (fastest lr per batch size, tables.fastest_to_target;
    fit_critical_batch with the same bootstrap), so the last row is the report's B_crit. A
    checkpoint is left out until MIN_BATCH_SIZES batch sizes have reached the target. Returns the
    rows (PROGRESS_COLUMNS) and, when there are none, why.
    """
    if checkpoints < 1:
        raise ValueError(f"checkpoints must be at least 1, but got {checkpoints=}.")
    if not 0 < first <= 1:
        raise ValueError(f"first must be in (0, 1], but got {first=}.")
    runs = trials.dropna(subset=["run_id", "batch_size"])
    if runs.empty:
        return pd.DataFrame(columns=PROGRESS_COLUMNS), "No trial has a run: there is no B_crit to follow."
    order = _completion_order(runs)
    compute = run_compute(runs, history)
    counts = sorted({max(1, math.ceil(share * len(order))) for share in np.linspace(first, 1.0, checkpoints)})
    rows = []
    for count in counts:
        done = runs["trial"].isin(order[:count])
        fastest, points = tables.fastest_to_target(runs[done])
        n_batch_sizes = int(fastest["batch_size"].nunique())
        if n_batch_sizes < MIN_BATCH_SIZES:
            continue
        fit = fit_critical_batch(
            points["batch_size"].to_numpy(dtype=float),
            points[tables.STEPS].to_numpy(dtype=float),
            samples_to_target=points[tables.SAMPLES].to_numpy(dtype=float),
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            seed=seed,
        )
        if fit is None:
            continue
        rows.append(
            {
                "trials": count,
                "runs": int(done.sum()),
                "compute": float(compute[done].sum()),
                "n_batch_sizes": n_batch_sizes,
                "b_crit": fit.b_crit,
                "b_crit_low": fit.b_crit_low,
                "b_crit_high": fit.b_crit_high,
                "at_edge": fit.at_search_edge,
            }
        )
    progress = pd.DataFrame(rows, columns=PROGRESS_COLUMNS)
    if not progress.empty and progress["trials"].iloc[-1] == len(order):
        return progress, ""
    reached = tables.fastest_to_target(runs)[0]["batch_size"].nunique()
    if reached == 0:
        return pd.DataFrame(columns=PROGRESS_COLUMNS), (
            "No trial reached the validation target in all its runs: there is no B_crit to follow over the sweep."
        )
    return pd.DataFrame(columns=PROGRESS_COLUMNS), (
        f"Only {reached} batch size{'s' * (reached != 1)} reached the target: following B_crit over the sweep "
        f"needs {MIN_BATCH_SIZES} with a fastest learning rate."
    )

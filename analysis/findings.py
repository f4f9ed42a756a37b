"""The report's opening: findings in plain sentences, computed from the analysis.

Sentences are plain text (the report escapes them); every branch says what is missing
rather than leaving a gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from batchscope.analysis import frontier, tables
from batchscope.analysis.analyze import FEW_EVALUATIONS, SweepAnalysis
from batchscope.analysis.findings_science import lr_law_sentence, noise_sentence
from batchscope.analysis.load import SweepData
from batchscope.analysis.text import interval, number


@dataclass(frozen=True)
class Findings:
    sentences: list[str]
    row: dict[str, str]  # one row of the multi-study comparison table


def _overview(sweep: SweepData, result: SweepAnalysis) -> str:
    trials = sweep.trials
    runs = trials.dropna(subset=["run_id"])
    n_trials = trials["trial"].nunique()
    seeds = runs["seed"].nunique() if not runs.empty else 0
    batch_sizes = sorted({int(b) for b in trials["batch_size"].dropna()})
    lrs = trials["lr"].dropna()
    parts = [f"{n_trials} trial{'s' * (n_trials != 1)}, {len(runs)} run{'s' * (len(runs) != 1)}"]
    if seeds:
        parts[0] += f" ({seeds} seed{'s' * (seeds != 1)})"
    if batch_sizes:
        parts.append(f"batch sizes {', '.join(map(str, batch_sizes))}")
    if not lrs.empty and lrs.min() == lrs.max():
        parts.append(f"learning rate {number(lrs.min())}")
    elif not lrs.empty:
        parts.append(f"learning rates {number(lrs.min())}–{number(lrs.max())}")
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result.status_counts.items()))
    sentence = "This sweep has " + "; ".join(parts) + "."
    if counts:
        sentence += f" Runs by status: {counts}."
    return sentence


def _critical_batch(result: SweepAnalysis) -> str:
    fit, points = result.critical_batch, result.target_points
    if fit is None:
        if points.empty:
            return (
                "No trial reached the validation target in all its runs, so the critical batch size cannot be fitted."
            )
        n_b = points["batch_size"].nunique()
        return (
            f"Only {len(points)} run{'s' * (len(points) != 1)} over {n_b} batch "
            f"size{'s' * (n_b != 1)} reached the target: too few to fit the critical batch "
            "size (it needs 3 runs over 2 batch sizes)."
        )
    n_b = points["batch_size"].nunique()
    sentence = (
        f"The critical batch size is about {number(fit.b_crit)} examples "
        f"({fit.confidence:.0%} bootstrap interval {interval(fit.b_crit_low, fit.b_crit_high)}), "
        f"fitted to the steps to target of the fastest learning rate at {n_b} batch sizes "
        f"(S_min ≈ {number(fit.s_min)} steps, {interval(fit.s_min_low, fit.s_min_high)}; E_min ≈ "
        f"{number(fit.e_min)} examples, {interval(fit.e_min_low, fit.e_min_high)}): below it, "
        "doubling the batch size nearly halves the steps; above it, the returns diminish."
    )
    low, high = fit.batch_size_range
    if fit.at_search_edge:
        sentence += (
            " The fit did not settle: steps to target "
            + ("keep halving" if fit.b_crit > high else "barely change")
            + " across the measured batch sizes, so B_crit is not identified; add "
            + ("larger" if fit.b_crit > high else "smaller")
            + " batch sizes."
        )
    elif not fit.within_measured_range:
        sentence += f" It lies outside the measured batch sizes ({number(low)}–{number(high)}): an extrapolation."
    return sentence + _target_reading(result)


def _target_reading(result: SweepAnalysis) -> str:
    if result.target_reading == "interpolated":
        sentence = (
            " Steps to target are interpolated between the evaluations before and after each crossing "
            "(the first evaluation past the target is on average half an interval late, which would bias B_crit low)."
        )
    else:
        sentence = (
            " These runs recorded steps to target at the first evaluation past it (on average half an "
            "evaluation interval late; most so for large batches), so B_crit is biased low."
        )
    if result.few_evaluations:
        sizes = ", ".join(map(str, result.few_evaluations))
        sentence += (
            f" At batch size{'s' * (len(result.few_evaluations) > 1)} {sizes} the target was reached by the "
            f"{'second' if FEW_EVALUATIONS == 2 else f'{FEW_EVALUATIONS}th'} evaluation: those steps rest on "
            "few points; evaluate more often (train.eval_every) for a sharper B_crit."
        )
    return sentence


def bracket_sentence(result: SweepAnalysis) -> str | None:
    """Whether each batch size's best lr has a tried lr on either side: an optimum at the edge of
    what was tried may lie outside it, and the steps to target there are then an overestimate."""
    brackets = result.lr_brackets
    if brackets.empty:
        return None
    which = "learning rate fastest to the target" if result.lr_basis == "fastest" else "best learning rate"
    open_ = brackets[brackets["kind"].isin(frontier.UNBRACKETED)]
    cliff = brackets[brackets["kind"] == frontier.DIVERGED_ABOVE]
    words = {frontier.LOWEST: "lowest lr tried", frontier.HIGHEST: "highest lr tried", frontier.ONLY: "only lr tried"}
    if open_.empty:
        sentence = (
            f"Every batch size's {which} is bracketed: a worse (or diverged) lr was tried on each side of it."
            if len(brackets) > 1
            else f"The {which} of the one batch size is bracketed by a worse (or diverged) lr on each side."
        )
    else:
        listed = ", ".join(f"{int(r.batch_size)} ({words[r.kind]})" for r in open_.itertuples())
        sentence = (
            f"The {which} is not bracketed at batch size{'s' * (len(open_) > 1)} {listed}: the optimum there "
            "may lie outside what was tried, so widen the lr range there (search.lr)"
            + (", or try more than one lr" if (open_["kind"] == frontier.ONLY).any() else "")
            + f"; it is bracketed at {len(brackets) - len(open_)} of {len(brackets)} batch sizes."
        )
    if not cliff.empty:
        sizes = ", ".join(str(int(b)) for b in cliff["batch_size"])
        sentence += (
            f" At {sizes} the next lr up diverged: the optimum lies below it but may sit right at the divergence cliff."
        )
    return sentence


def _quickest(result: SweepAnalysis) -> str:
    shown = result.fastest.dropna(subset=[tables.TIME])
    if shown.empty:
        return "No run reached the target, so there is no time to target to compare."
    best = shown.loc[shown[tables.TIME].idxmin()]
    sentence = (
        f"Batch size {int(best['batch_size'])} reached the target in the least wall-clock time: "
        f"{number(best[tables.TIME])} s at lr {number(best['lr'])} (mean over "
        f"{int(best['n_runs'])} run{'s' * (int(best['n_runs']) != 1)})"
    )
    if len(shown) > 1:
        ranked = shown.sort_values(tables.TIME)
        second, worst = ranked.iloc[1], ranked.iloc[-1]
        noise = _time_noise(result, [int(best["batch_size"]), int(second["batch_size"])])
        ratio = second[tables.TIME] / best[tables.TIME]
        if math.isfinite(noise) and math.log(ratio) < 2 * noise:
            sentence += (
                f"; batch size {int(second['batch_size'])} ({number(second[tables.TIME])} s) is within the timing "
                f"noise of these runs (step times vary by ±{noise:.0%} within them): the two are not told apart"
            )
        if len(shown) > 2 or not (math.isfinite(noise) and math.log(ratio) < 2 * noise):
            ratio = worst[tables.TIME] / best[tables.TIME]
            sentence += (
                f"; the slowest, batch size {int(worst['batch_size'])}, took {number(worst[tables.TIME])} s "
                f"({ratio:.1f}×)"
            )
    return sentence + "."


def _time_noise(result: SweepAnalysis, batch_sizes: list[int]) -> float:
    """Relative timing noise of two runs' times: their step times' variation within each run, combined."""
    costs = result.run_costs
    if "step_time_cv" not in costs or costs.empty:
        return math.nan
    cv = costs[costs["batch_size"].isin(batch_sizes)].groupby("batch_size", observed=True)["step_time_cv"].median()
    if len(cv) < 2 or not np.isfinite(cv.to_numpy()).all():
        return math.nan
    return float(np.sqrt((cv**2).sum()))


def _best_trial(result: SweepAnalysis) -> str:
    best = result.best_trial
    if best is None:
        return "No trial completed with an objective value."
    n_runs = int(best.get("n_runs", 0))
    runs = "one run, so no interval" if n_runs == 1 else f"mean of {n_runs} runs"
    return (
        f"Best trial: #{int(best['trial'])}, batch size {int(best['batch_size'])} and lr "
        f"{number(best['lr'])}, with {result.score_label} = {number(best[result.score])} ({runs})."
    )


def _generalization(sweep: SweepData, result: SweepAnalysis) -> str | None:
    runs = sweep.trials
    best_ids = {r for ids in result.best_runs.values() for r in ids}
    if "final/gen_gap" not in runs or not best_ids:
        return None
    at_best = runs[runs["run_id"].isin(best_ids)].dropna(subset=["final/gen_gap"])
    grouped = at_best.groupby("batch_size")["final/gen_gap"]
    gaps, errors, counts = grouped.mean(), grouped.sem(), grouped.count()
    if len(gaps) < 2:
        return None
    small, large = gaps.index.min(), gaps.index.max()

    def shown(b: int) -> str:
        return number(gaps[b]) + (f" ± {number(errors[b])}" if counts[b] > 1 else "")

    sentence = (
        f"At the best learning rates the generalization gap (validation minus training loss) goes from "
        f"{shown(small)} at batch size {int(small)} to {shown(large)} at {int(large)}"
    )
    if (counts[[small, large]] == 1).any():
        sentence += " (one run per batch size: no interval)"
    return sentence + "."


def _batchnorm(sweep: SweepData) -> str | None:
    """BatchNorm statistics come from the micro-batch: say where that was not the whole batch."""
    runs = sweep.trials
    if "batchnorm" not in runs or "micro_batch_size" not in runs:
        return None
    bn = runs[runs["batchnorm"].astype(str).str.lower() == "true"]
    if bn.empty:
        return None
    micro = pd.to_numeric(bn["micro_batch_size"], errors="coerce")
    split = bn[micro < pd.to_numeric(bn["batch_size"], errors="coerce")]
    notes = []
    if not split.empty:
        sizes = ", ".join(str(int(b)) for b in sorted(split["batch_size"].dropna().unique()))
        micros = ", ".join(str(int(m)) for m in sorted(micro[split.index].dropna().unique()))
        notes.append(
            f"BatchNorm normalized over micro-batches of {micros} examples instead of the whole batch in "
            f"{len(split)} run(s) (batch sizes {sizes}): their statistics are those of the smaller batch."
        )
    if "gns" in bn:
        halves = bn[(bn["gns"].astype(str).str.lower() == "true") & ~bn.index.isin(split.index)]
        if not halves.empty:
            notes.append(
                "On noise-scale measuring steps (every `gns_every` steps) BatchNorm saw half batches in "
                f"{len(halves)} run(s)."
            )
    return " ".join(notes) or None


def _row(sweep: SweepData, result: SweepAnalysis) -> dict[str, str]:
    fit, lr_fit, noise = result.critical_batch, result.lr_scaling, result.noise_scale
    quick = result.fastest.dropna(subset=[tables.TIME])
    best = result.best_trial
    quickest = "n/a"
    if not quick.empty:
        row = quick.loc[quick[tables.TIME].idxmin()]
        quickest = f"{int(row['batch_size'])} ({number(row[tables.TIME])} s)"
    alpha = "n/a"
    law = result.lr_law
    if law is not None:
        alpha = f"{law.slope_below:.2f}"
        if np.isfinite(law.slope_below_low):
            alpha += f" [{law.slope_below_low:.2f}, {law.slope_below_high:.2f}]"
    elif lr_fit is not None:
        alpha = f"{lr_fit.exponent:.2f} (power law)"
    near = noise.near_target if noise is not None else None
    return {
        "study": sweep.study_name,
        "trials / runs": f"{sweep.trials['trial'].nunique()} / {int(sweep.trials['run_id'].notna().sum())}",
        "B_crit [95%]": (f"{number(fit.b_crit)} [{interval(fit.b_crit_low, fit.b_crit_high)}]" if fit else "n/a"),
        "quickest B (time to target)": quickest,
        "lr slope below the knee [95%]": alpha,
        "B_simple near target (± s.e.)": (
            f"{number(near.b_simple)} ± {number(near.stderr)}" if near is not None and near.defined else "n/a"
        ),
        "best objective": (
            f"{number(best[result.score])} (#{int(best['trial'])}, B={int(best['batch_size'])})"
            if best is not None
            else "n/a"
        ),
    }


def findings(sweep: SweepData, result: SweepAnalysis) -> Findings:
    sentences = [
        _overview(sweep, result),
        _critical_batch(result),
        _quickest(result),
        lr_law_sentence(
            result.lr_law,
            result.lr_scaling,
            result.lr_rule,
            {},  # the bracketing has a sentence of its own, next
            len(result.lr_points),
            result.lr_basis,
        ),
        *filter(None, [bracket_sentence(result)]),
        noise_sentence(result.noise_scale, result.noise_note, result.critical_batch),
        _best_trial(result),
    ]
    for extra in (_generalization(sweep, result), _batchnorm(sweep)):
        if extra:
            sentences.append(extra)
    return Findings(sentences=sentences, row=_row(sweep, result))


# The per-batch table's "bracketed" column: on which sides of the best lr a worse one was tried.
_SIDES = {
    frontier.BRACKETED: "both sides",
    frontier.DIVERGED_ABOVE: "both (diverged above)",
    frontier.LOWEST: "above only",
    frontier.HIGHEST: "below only",
    frontier.ONLY: "no (one lr)",
}


def per_batch_note(result: SweepAnalysis) -> str:
    """Why the per-batch table's numbers carry no interval of their own."""
    runs = int(result.trial_summary["n_runs"].max()) if "n_runs" in result.trial_summary else 1
    each = "one run" if runs <= 1 else f"the mean of its {runs} runs (seeds)"
    which = "fastest" if result.lr_basis == "fastest" else "best"
    return (
        f"Each row is one trial per column (the best by the objective, and the fastest to the target): {each}, "
        "so no interval of its own; the spread over seeds and learning rates is in the steps-to-target chart "
        "and in the critical batch size's bootstrap interval. lr bracket: the nearest learning rates tried below "
        f"and above the {which} lr (≤/≥ … (edge): it is the lowest/highest tried, so the optimum may lie beyond). "
        "Throughput: the median over the batch size's runs."
    )


def per_batch_table(result: SweepAnalysis) -> pd.DataFrame:
    """One row per batch size: best lr and objective, fastest lr and its cost to the target."""
    best = result.best_lr.rename(columns={"lr": "best lr", "score": "objective"})[
        ["batch_size", "best lr", "objective"]
    ]
    fastest = result.fastest.rename(
        columns={
            "lr": "fastest lr",
            tables.STEPS: "steps to target",
            tables.TIME: "time to target [s]",
        }
    )[["batch_size", "fastest lr", "steps to target", "time to target [s]"]]
    costs = result.run_costs.groupby("batch_size", observed=True)["samples_per_s"].median()
    table = best.merge(fastest, on="batch_size", how="outer")
    if result.lr_rule != "none":
        # The searched lr is the base one; what each batch size trained with is scaled by the rule.
        by_batch = dict(zip(result.lr_points["batch_size"], result.lr_points["fitted_lr"], strict=True))
        which = "fastest" if result.lr_basis == "fastest" else "best"
        table[f"{which} lr, effective ({result.lr_rule})"] = table["batch_size"].map(by_batch)
        table = table.rename(columns={"best lr": "best lr (base)", "fastest lr": "fastest lr (base)"})
    brackets = result.lr_brackets.itertuples()
    shown = {int(r.batch_size): (frontier.bracket_text(r.kind, r.lr, r.lr_below, r.lr_above), r.kind) for r in brackets}
    table["lr bracket"] = table["batch_size"].map(lambda b: shown[b][0] if b in shown else None)
    table["bracketed"] = table["batch_size"].map(lambda b: _SIDES[shown[b][1]] if b in shown else None)
    table["throughput [examples/s]"] = table["batch_size"].map(costs)
    table = table.sort_values("batch_size").reset_index(drop=True)
    return table.rename(columns={"batch_size": "batch size"})

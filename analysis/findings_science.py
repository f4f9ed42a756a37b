"""The report's sentences on the learning-rate law and the noise scale: the two findings whose
outcome the theory predicts, so their words must follow the intervals and come out either way.

Each function takes plain fits and estimates (no sweep), so every branch can be tested with
made-up numbers: a slope that rises, falls or stays flat; a ratio that includes 1 or not.
"""

from __future__ import annotations

import math

from batchscope.analysis.analyze import NoiseScaleSummary, Ratio
from batchscope.analysis.fits import CriticalBatchFit, LrLawFit, PowerLawFit
from batchscope.analysis.noise import CONFIDENCE, NoiseEstimate
from batchscope.analysis.text import interval, number

# Scaling rules a measured learning-rate slope is compared with.
RULES = ((1.0, "linear scaling (slope 1; Goyal et al. 2017, McCandlish et al. 2018 for SGD)"),
         (0.5, "square-root scaling (slope 0.5; Malladi et al. 2022 for Adam)"))  # fmt: skip
_EDGE_WORDS = {"lowest": "the lowest", "highest": "the highest", "only": "the only"}


def _slope_words(low: float, high: float) -> str:
    """The direction a slope's interval allows: only a sign the interval excludes the other of."""
    if low > 0:
        return "rises with the batch size"
    if high < 0:
        return "falls as the batch size grows"
    return "shows no clear trend with the batch size (the interval includes 0)"


def _rule_words(low: float, high: float) -> str:
    inside = [name for slope, name in RULES if low <= slope <= high]
    if len(inside) == 2 and low <= 0:
        return "too uncertain to tell linear, square-root or no scaling apart"
    if len(inside) == 2:
        return "consistent with both linear and square-root scaling; more batch sizes or seeds would tell them apart"
    if inside:
        other = next(name.split(" (")[0] for _, name in RULES if name != inside[0])
        return f"consistent with {inside[0]}, not with {other}"
    if low > 1.0:
        return "steeper than linear scaling: neither rule fits"
    if high < 0.5:
        return "flatter than square-root scaling: neither rule fits" if low > 0 else "neither rule fits"
    return "between square-root and linear scaling: neither rule fits"


def lr_law_sentence(
    law: LrLawFit | None,
    power: PowerLawFit | None,
    rule: str,
    edges: dict[int, str],
    n_batch_sizes: int,
    basis: str = "objective",
) -> str:
    """What the best learning rates say about the lr law ε(B) = ε_max/(1 + B_*/B), in words
    that follow the intervals (McCandlish et al. 2018). `basis`: "fastest" when the points are
    each batch size's lr that reached the target in the fewest steps, "objective" the best by it."""
    lr = "learning rate" if rule == "none" else f"effective learning rate (the base lr scaled by the {rule} rule)"
    what = f"The best {lr}" if basis == "objective" else f"The {lr} that reached the target fastest"
    if law is None:
        if power is None:
            n = n_batch_sizes
            return f"The learning-rate law needs completed trials at 3 or more batch sizes; this sweep has {n}."
        sentence = f"{what} goes as B^{power.exponent:.2f} from {power.n_points} batch sizes (too few for an interval)."
        return sentence + _edge_sentence(edges)
    if not law.slope_identified:
        sentence = (
            f"{what} shows no slope that the {law.n_points} best learning rates can pin down (no knee with "
            "points below it: the lr is about flat over the batch sizes, or too few batch sizes)."
        )
        return sentence + " " + _knee_sentence(law) + _power_sentence(power) + _edge_sentence(edges)
    sentence = f"{what} {_slope_words(law.slope_below_low, law.slope_below_high)}"
    if math.isfinite(law.slope_below_low):
        sentence += (
            f": below the knee it goes as B^{law.slope_below:.2f} ({law.confidence:.0%} interval "
            f"{law.slope_below_low:.2f} to {law.slope_below_high:.2f}), "
            + _rule_words(law.slope_below_low, law.slope_below_high)
        )
    else:
        sentence += f": below the knee it goes as B^{law.slope_below:.2f} (3 batch sizes: no interval)"
    return sentence + ". " + _knee_sentence(law) + _power_sentence(power) + _edge_sentence(edges)


def _power_sentence(power: PowerLawFit | None) -> str:
    if power is None or not math.isfinite(power.exponent_low):
        return ""
    return (
        f" One power law across all {power.n_points} batch sizes would give B^{power.exponent:.2f} "
        f"({power.exponent_low:.2f} to {power.exponent_high:.2f}), an average over both regimes."
    )


def _knee_sentence(law: LrLawFit) -> str:
    low, high = law.batch_size_range
    if law.at_search_edge or not low <= law.b_star <= high:
        if law.b_star > high:
            return (
                f"It has not flattened by the largest batch size ({number(high)}): the knee B_* of "
                "McCandlish et al.'s law ε_max/(1 + B_*/B) lies above the measured range."
            )
        return (
            f"It is flat from the smallest batch size ({number(low)}) on: the knee B_* of McCandlish et al.'s "
            "law ε_max/(1 + B_*/B) lies below the measured range."
        )
    return (
        f"Fitted to McCandlish et al.'s law ε_max/(1 + B_*/B), it flattens above B_* ≈ {number(law.b_star)} "
        f"examples ({law.confidence:.0%} bootstrap interval {interval(law.b_star_low, law.b_star_high)}) at "
        f"ε_max ≈ {number(law.eps_max)} ({interval(law.eps_max_low, law.eps_max_high)}); B_* is a second "
        "estimate of the noise scale."
    )


def _edge_sentence(edges: dict[int, str]) -> str:
    if not edges:
        return ""
    by_kind: dict[str, list[int]] = {}
    for b, kind in sorted(edges.items()):
        by_kind.setdefault(kind, []).append(b)
    parts = [
        f"at batch size{'s' * (len(bs) > 1)} {', '.join(map(str, bs))} the best lr is {_EDGE_WORDS[kind]} one tried"
        for kind, bs in by_kind.items()
    ]
    return (
        " Not bracketed: "
        + "; ".join(parts)
        + ", so the optimum there may lie outside what was tried (widen search.lr or add trials there)."
    )


def _estimate(est: NoiseEstimate) -> str:
    if est.n < 2:
        return f"not measured well enough ({est.n} measurement{'s' * (est.n != 1)}: no interval)"
    if est.bounded:
        imprecise = f"; imprecise: {est.n} measurements" if est.high > 3 * est.low else ""
        return f"{number(est.b_simple)} examples ({CONFIDENCE:.0%} interval {interval(est.low, est.high)}{imprecise})"
    if math.isfinite(est.low) and est.low > 0:
        return (
            f"at least {number(est.low)} examples ({CONFIDENCE:.0%} lower bound from {est.n} measurements; their "
            "mean |G|² is not distinguishable from 0, so there is no upper bound)"
        )
    return f"not determined by its {est.n} measurements (their mean |G|² is lost in the noise)"


def noise_sentence(noise: NoiseScaleSummary | None, note: str, fit: CriticalBatchFit | None) -> str:
    """B_simple early, late and near the target with standard errors, and B_crit against it."""
    if noise is None:
        return note
    sentence = (
        f"The gradient noise scale B_simple at the best learning rates was {_estimate(noise.early)} over "
        f"the first {number(noise.window)} steps and {_estimate(noise.late)} over the last quarter of training "
        f"(the ratio of the mean |G|² and tr Σ of every measurement, {noise.late.n} in {noise.late.n_runs} "
        f"run{'s' * (noise.late.n_runs != 1)} late, batch sizes weighted by the precision of their reads; "
        "Fieller's interval)."
    )
    if any(not e.bounded or e.high > 3 * e.low for e in (noise.early, noise.late)):
        sentence += (
            " For a sharper estimate measure more often (train.gns.every: a smaller n, at some cost in speed) "
            "or train longer."
        )
    near = noise.near_target
    if near is None or near.n == 0:
        return sentence + " No measurement lies on the way to the target, so B_crit is not compared with it."
    sentence += f" Near the target (from half the steps to target to the crossing) it was {_estimate(near)}."
    return sentence + " " + vs_b_crit_sentence(noise.vs_b_crit, fit)


def vs_b_crit_sentence(ratio: Ratio | None, fit: CriticalBatchFit | None) -> str:
    if fit is None:
        return "There is no fitted B_crit to compare it with."
    if ratio is None:
        return "B_crit or B_simple is not identified, so the two are not compared."
    if math.isnan(ratio.value):
        verdict = (
            "so B_crit is smaller than B_simple there"
            if ratio.high < 1
            else "which does not test B_crit ≈ B_noise (McCandlish et al.) either way"
        )
        return f"With only a lower bound on B_simple, B_crit is at most {ratio.high:.2f}× B_simple, {verdict}."
    caveat = (
        " B_simple equals the noise scale B_noise only for a well-conditioned Hessian (McCandlish et al. 2018), "
        "so this compares B_crit with an approximation of B_noise."
    )
    shown = f"B_crit is {ratio.value:.2f}× B_simple near the target ({ratio.confidence:.0%} interval " + (
        f"{ratio.low:.2f}–{ratio.high:.2f}×)"
    )
    if ratio.includes_one:
        return shown + ": consistent with B_crit ≈ B_noise, as McCandlish et al. predict." + caveat
    side = "larger" if ratio.low > 1 else "smaller"
    return shown + f": B_crit is {side} than B_simple (the interval excludes 1)." + caveat

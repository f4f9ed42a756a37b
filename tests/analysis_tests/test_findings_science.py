"""The lr-law and noise-scale sentences follow their intervals: every claim can come out either way."""

from __future__ import annotations

import math

import pytest

from batchscope.analysis.analyze import NoiseScaleSummary, Ratio, ratio_interval
from batchscope.analysis.findings_science import lr_law_sentence, noise_sentence, vs_b_crit_sentence
from batchscope.analysis.fits import CriticalBatchFit, LrLawFit, PowerLawFit
from batchscope.analysis.noise import NoiseEstimate


def law(
    slope: float, low: float, high: float, *, b_star: float = 256.0, edge: bool = False, identified: bool = True
) -> LrLawFit:
    fields = dict(
        eps_max=0.5, eps_max_low=0.4, eps_max_high=0.6, b_star=b_star, b_star_low=b_star / 2,
        b_star_high=b_star * 2, slope_below=slope, slope_below_low=low, slope_below_high=high, n_below=4,
        confidence=0.95, n_points=7, batch_size_range=(16.0, 1024.0), at_search_edge=edge,
    )  # fmt: skip
    return LrLawFit(**fields, slope_identified=identified)  # type: ignore[arg-type]


POWER = PowerLawFit(exponent=0.6, exponent_low=0.4, exponent_high=0.8, prefactor=0.01, confidence=0.95, n_points=7)


@pytest.mark.parametrize(
    ("slope", "low", "high", "direction", "rule"),
    [
        (0.96, 0.80, 1.12, "rises with the batch size", "consistent with linear scaling"),
        (0.52, 0.35, 0.70, "rises with the batch size", "consistent with square-root scaling"),
        (0.75, 0.45, 1.05, "rises with the batch size", "consistent with both linear and square-root"),
        (1.60, 1.30, 1.90, "rises with the batch size", "steeper than linear scaling"),
        (0.02, -0.20, 0.24, "shows no clear trend", "neither rule fits"),
        (-0.61, -0.90, -0.32, "falls as the batch size grows", "neither rule fits"),
    ],
)
def test_lr_sentence_follows_the_slope_interval(
    slope: float, low: float, high: float, direction: str, rule: str
) -> None:
    text = lr_law_sentence(law(slope, low, high), POWER, "none", {}, 7)
    assert text.startswith(f"The best learning rate {direction}")
    assert f"B^{slope:.2f}" in text  # the sign is shown as it is: never "grows as B^-0.61"
    assert rule in text
    if low > 0 or high < 0:
        assert "includes 0" not in text


def test_lr_sentence_states_the_knee_or_its_absence() -> None:
    inside = lr_law_sentence(law(1.0, 0.8, 1.2), POWER, "none", {}, 7)
    assert "flattens above B_* ≈ 256 examples" in inside and "second estimate of the noise scale" in inside
    above = lr_law_sentence(law(0.5, 0.4, 0.6, b_star=5e4, edge=True), POWER, "none", {}, 7)
    assert "has not flattened by the largest batch size (1024)" in above
    below = lr_law_sentence(law(0.0, -0.2, 0.2, b_star=0.5, edge=True), POWER, "none", {}, 7)
    assert "flat from the smallest batch size (16)" in below


def test_lr_sentence_names_the_scaling_rule_and_unbracketed_optima() -> None:
    text = lr_law_sentence(law(1.0, 0.8, 1.2), POWER, "linear", {16: "highest", 1024: "lowest", 512: "lowest"}, 7)
    assert "best effective learning rate (the base lr scaled by the linear rule)" in text
    assert "batch size 16 the best lr is the highest one tried" in text
    assert "batch sizes 512, 1024 the best lr is the lowest one tried" in text


def test_lr_sentence_without_an_identified_slope_says_so() -> None:
    text = lr_law_sentence(law(0.1, -2.0, 3.0, b_star=1.0, edge=True, identified=False), POWER, "none", {}, 7)
    assert "no slope that the 7 best learning rates can pin down" in text
    assert "rises" not in text and "falls" not in text


def test_lr_sentence_with_too_few_batch_sizes() -> None:
    assert "3 or more batch sizes; this sweep has 1" in lr_law_sentence(None, None, "none", {}, 1)


def fit(b_crit: float, low: float, high: float) -> CriticalBatchFit:
    return CriticalBatchFit(
        s_min=50.0, b_crit=b_crit, b_crit_low=low, b_crit_high=high, confidence=0.95, n_points=7,
        batch_size_range=(16.0, 1024.0), at_search_edge=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("b_crit", "b_simple", "verdict"),
    [
        (300.0, 280.0, "consistent with B_crit ≈ B_noise"),
        (900.0, 150.0, "B_crit is larger than B_simple (the interval excludes 1)"),
        (60.0, 400.0, "B_crit is smaller than B_simple (the interval excludes 1)"),
    ],
)
def test_b_crit_against_b_simple_can_come_out_either_way(b_crit: float, b_simple: float, verdict: str) -> None:
    f = fit(b_crit, b_crit / 1.5, b_crit * 1.5)
    near = NoiseEstimate(b_simple, 0.1 * b_simple, 40, 5, 0.8 * b_simple, 1.2 * b_simple)
    ratio = ratio_interval(f.b_crit, math.log(1.5) / 1.96, near.b_simple, near.log_stderr(), 0.95)
    assert ratio is not None and ratio.value == pytest.approx(b_crit / b_simple)
    text = vs_b_crit_sentence(ratio, f)
    assert verdict in text
    assert "well-conditioned Hessian" in text  # B_simple ≈ B_noise is an approximation, said each time


def test_ratio_interval_combines_both_errors_on_the_log_scale() -> None:
    # ln-scale errors 0.1 and 0.2: half width 1.96·sqrt(0.05) = 0.438 → ×/÷ 1.55.
    ratio = ratio_interval(200.0, 0.1, 100.0, 0.2, 0.95)
    assert ratio == Ratio(2.0, pytest.approx(2.0 / 1.5497, rel=1e-3), pytest.approx(2.0 * 1.5497, rel=1e-3), 0.95)
    assert ratio_interval(200.0, math.nan, 100.0, 0.2, 0.95) is None


def test_noise_sentence_gives_every_estimate_with_its_interval() -> None:
    est = NoiseEstimate(150.0, 12.0, 30, 3, 128.0, 176.0)
    summary = NoiseScaleSummary(
        window=200.0, early=NoiseEstimate(math.nan, math.nan, 4, 3), late=est, near_target=est,
        per_batch={}, vs_b_crit=Ratio(1.2, 0.8, 1.8, 0.95),
    )  # fmt: skip
    text = noise_sentence(summary, "", fit(180.0, 120.0, 270.0))
    assert "not determined by its 4 measurements" in text  # said, not dropped
    assert "measure more often (train.gns.every" in text
    assert "150 examples (95% interval 128–176) over the last quarter" in text
    assert "Near the target (from half the steps to target to the crossing) it was 150 examples (95% interval" in text
    assert "B_crit is 1.20× B_simple" in text and "consistent with" in text
    assert (
        noise_sentence(None, "No gradient noise scale was measured.", None) == "No gradient noise scale was measured."
    )


@pytest.mark.parametrize(("b_crit_high", "verdict"), [(400.0, "does not test"), (250.0, "B_crit is smaller")])
def test_with_only_a_lower_bound_on_b_simple_the_comparison_is_one_sided(b_crit_high: float, verdict: str) -> None:
    near = NoiseEstimate(2000.0, 5000.0, 12, 3, 300.0, math.inf)
    summary = NoiseScaleSummary(
        window=200.0, early=near, late=near, near_target=near, per_batch={},
        vs_b_crit=Ratio(math.nan, 0.0, b_crit_high / 300.0, 0.95),
    )  # fmt: skip
    text = noise_sentence(summary, "", fit(200.0, 150.0, b_crit_high))
    assert "at least 300 examples (95% lower bound from 12 measurements" in text
    assert verdict in text

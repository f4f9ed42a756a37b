"""Fits against synthetic points with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.fits import fit_critical_batch, fit_lr_exponent, fit_power_law

BATCH_SIZES = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=float)


def _steps_points(s_min: float, b_crit: float, *, noise: float, seeds: int, rng_seed: int):
    rng = np.random.default_rng(rng_seed)
    batch_sizes = np.repeat(BATCH_SIZES, seeds)
    steps = s_min * (1 + b_crit / batch_sizes) * np.exp(rng.normal(0, noise, batch_sizes.size))
    return batch_sizes, steps


@pytest.mark.parametrize(
    ("s_min", "b_crit", "noise", "seeds"),
    [
        # Noise is multiplicative, like seed-to-seed spread of steps to target; at these levels
        # 10% is about 3 standard errors of the fitted B_crit (checked over 150 draws each).
        (100.0, 128.0, 0.05, 3),
        (500.0, 2000.0, 0.03, 3),
        (50.0, 30.0, 0.05, 3),
        (1000.0, 300.0, 0.03, 1),
    ],
)
def test_critical_batch_recovered_within_10_percent(s_min, b_crit, noise, seeds):
    batch_sizes, steps = _steps_points(s_min, b_crit, noise=noise, seeds=seeds, rng_seed=7)
    fit = fit_critical_batch(batch_sizes, steps, samples_to_target=steps * batch_sizes)

    assert fit is not None
    assert fit.b_crit == pytest.approx(b_crit, rel=0.10)
    assert fit.s_min == pytest.approx(s_min, rel=0.10)
    # E = S·B: the examples curve shares the fit, E_min = S_min·B_crit.
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=0.15)
    assert fit.b_crit_low <= b_crit <= fit.b_crit_high
    assert fit.b_crit_low < fit.b_crit < fit.b_crit_high
    assert fit.within_measured_range and not fit.at_search_edge


def test_critical_batch_curves_follow_the_model():
    batch_sizes, steps = _steps_points(200.0, 256.0, noise=0.0, seeds=1, rng_seed=0)
    fit = fit_critical_batch(batch_sizes, steps)

    assert fit is not None
    np.testing.assert_allclose(fit.steps(batch_sizes), steps, rtol=1e-3)
    np.testing.assert_allclose(fit.samples(batch_sizes), steps * batch_sizes, rtol=1e-3)


def test_critical_batch_ignores_runs_that_never_reached_the_target():
    batch_sizes, steps = _steps_points(100.0, 128.0, noise=0.03, seeds=2, rng_seed=1)
    steps[::3] = np.nan  # target not reached
    steps[1] = 0.0

    fit = fit_critical_batch(batch_sizes, steps)

    assert fit is not None
    assert fit.b_crit == pytest.approx(128.0, rel=0.10)
    assert fit.n_points == np.isfinite(steps).sum() - 1


def test_critical_batch_not_identified_under_perfect_scaling():
    # S ∝ 1/B at every measured batch size: B_crit is beyond the sweep.
    steps = 1e5 / BATCH_SIZES
    fit = fit_critical_batch(BATCH_SIZES, steps)

    assert fit is not None
    assert fit.at_search_edge
    assert not fit.within_measured_range


@pytest.mark.parametrize(
    ("batch_sizes", "steps"),
    [
        ([64, 64, 64], [100, 110, 105]),  # one batch size
        ([32, 64], [200, 120]),  # two points: nothing left for an interval
        ([32, 64, 128], [math.nan, math.nan, 100]),
        ([], []),
    ],
)
def test_critical_batch_needs_three_points_over_two_batch_sizes(batch_sizes, steps):
    assert fit_critical_batch(batch_sizes, steps) is None


def test_critical_batch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="confidence"):
        fit_critical_batch([1, 2, 3], [3, 2, 1], confidence=1.5)
    with pytest.raises(ValueError, match="shape"):
        fit_critical_batch([1, 2, 3], [3, 2])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.3])
def test_lr_exponent_recovered(alpha):
    rng = np.random.default_rng(3)
    best_lrs = 0.02 * (BATCH_SIZES / 64) ** alpha * np.exp(rng.normal(0, 0.1, BATCH_SIZES.size))

    fit = fit_lr_exponent(BATCH_SIZES, best_lrs)

    assert fit is not None
    assert fit.exponent == pytest.approx(alpha, abs=0.05)
    assert fit.exponent_low <= alpha <= fit.exponent_high
    np.testing.assert_allclose(fit.predict([64.0]), [0.02], rtol=0.15)


def test_lr_exponent_from_two_batch_sizes_has_no_interval():
    fit = fit_power_law([32, 128], [0.01, 0.02])

    assert fit is not None
    assert fit.exponent == pytest.approx(0.5)
    assert math.isnan(fit.exponent_low) and math.isnan(fit.exponent_high)


def test_lr_exponent_needs_two_batch_sizes():
    assert fit_lr_exponent([64, 64], [0.01, 0.02]) is None
    assert fit_lr_exponent([64], [0.01]) is None

"""The noise scale from stored measurements: ratio of means, Fieller's interval, windows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from batchscope.analysis.noise import estimate, fieller_interval, over_training, ratio_of_means


def draws(rng: np.random.Generator, n: int, grad_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """n unbiased, noisy two-batch reads of |G|² = 1 and tr Σ = 200 (B_simple = 200)."""
    return 1.0 + rng.normal(0.0, grad_sd, n), 200.0 + rng.normal(0.0, 60.0, n)


@pytest.mark.parametrize("grad_sd", [0.3, 1.0])
def test_fieller_interval_covers_the_truth_95_percent_of_the_time(grad_sd: float) -> None:
    # 1,000 windows of 30 measurements. Seen: 94% covered at both noise levels.
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(1000):
        low, high = fieller_interval(*draws(rng, 30, grad_sd))
        assert math.isfinite(high)  # |G|² clear of 0 in every window here
        covered += low <= 200.0 <= high
    assert 0.92 <= covered / 1000 <= 0.98


def test_with_the_gradient_lost_in_the_noise_only_a_lower_bound_is_given() -> None:
    # Mean |G|² within its noise of 0 (sd 3 per read, 30 reads): the delta method would still print
    # a finite ± that covers nothing; Fieller's interval has no upper end and a lower bound that
    # holds. Seen: 55% of windows unbounded, the truth above the bound in 95%.
    rng = np.random.default_rng(1)
    unbounded = below = 0
    for _ in range(1000):
        low, high = fieller_interval(*draws(rng, 30, 3.0))
        if math.isinf(high):
            unbounded += 1
            below += math.isnan(low) or low <= 200.0
    assert unbounded > 300
    assert below / unbounded > 0.9


def test_fieller_agrees_with_the_delta_method_when_the_gradient_is_clear() -> None:
    rng = np.random.default_rng(2)
    g, t = draws(rng, 400, 0.2)
    ratio, se = ratio_of_means(g, t)
    low, high = fieller_interval(g, t)
    assert low == pytest.approx(ratio - 1.966 * se, rel=0.02)
    assert high == pytest.approx(ratio + 1.966 * se, rel=0.02)


@pytest.mark.parametrize(("g", "t"), [([1.0], [5.0]), ([], [])])
def test_fewer_than_two_measurements_bound_nothing(g: list[float], t: list[float]) -> None:
    assert all(math.isnan(v) for v in fieller_interval(np.array(g), np.array(t)))


def test_estimate_and_windows_read_every_measurement() -> None:
    # Two runs, measurements every step 1..20; windows of 10 steps end at 10 and 20.
    rng = np.random.default_rng(3)
    rows = []
    for run in ("a", "b"):
        g, t = draws(rng, 20, 0.3)
        rows += [(run, 64, step, gi, ti) for step, gi, ti in zip(range(1, 21), g, t, strict=True)]
    raw = pd.DataFrame(rows, columns=["run_id", "batch_size", "step", "grad_sq", "trace_sigma"])
    est = estimate(raw)
    assert (est.n, est.n_runs) == (40, 2)
    assert est.b_simple == pytest.approx(raw["trace_sigma"].mean() / raw["grad_sq"].mean())
    assert est.bounded and est.low < est.b_simple < est.high
    windows = over_training(raw, 10)
    assert sorted(windows["step"].unique()) == [10.0, 20.0]
    assert (windows["n"] == 10).all()


def test_batch_sizes_are_pooled_by_the_precision_of_their_reads() -> None:
    # 300 reads at batch 16 whose |G|² noise is 20× that of 30 reads at batch 1024 (same truth, 200):
    # weighted by inverse variance the pooled interval is about as narrow as the precise group's
    # alone, where a plain mean would be ruled by the noisy reads. Both cover the truth.
    rng = np.random.default_rng(4)
    g_small, t_small = draws(rng, 300, 6.0)
    g_big, t_big = draws(rng, 30, 0.3)
    rows = [("s", 16, i, g, t) for i, (g, t) in enumerate(zip(g_small, t_small, strict=True))]
    rows += [("b", 1024, i, g, t) for i, (g, t) in enumerate(zip(g_big, t_big, strict=True))]
    raw = pd.DataFrame(rows, columns=["run_id", "batch_size", "step", "grad_sq", "trace_sigma"])
    pooled, big_alone = estimate(raw), estimate(raw[raw["batch_size"] == 1024])
    plain = fieller_interval(raw["grad_sq"].to_numpy(), raw["trace_sigma"].to_numpy())
    assert pooled.bounded and pooled.low <= 200.0 <= pooled.high
    assert pooled.high - pooled.low <= 1.1 * (big_alone.high - big_alone.low)
    assert not math.isfinite(plain[1]) or plain[1] - plain[0] > 2 * (pooled.high - pooled.low)

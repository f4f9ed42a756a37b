"""The two-batch estimators and their window over training on inputs whose answer is known exactly.

For a batch mean of B i.i.d. per-example gradients, E|G_B|² = |G|² + tr(Σ)/B. Feeding
that expectation at two batch sizes must give back |G|² and tr(Σ) exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchscope.trainers.noise_scale_in_loop import NoiseScaleWindow, grad_sq_norm, ratio_of_means, two_batch_estimates


def expected_sq_norm(grad_sq: float, trace_sigma: float, batch_size: float) -> float:
    return grad_sq + trace_sigma / batch_size


@pytest.mark.parametrize(
    ("grad_sq", "trace_sigma", "b_small", "b_big"),
    [
        (1.0, 10.0, 1, 2),
        (1.0, 201.0, 64, 1024),
        (0.25, 3.0, 7, 13),  # batch sizes that divide nothing evenly
        (2.0, 0.0, 8, 64),  # no noise: every batch has the full gradient
        (0.0, 50.0, 8, 64),  # at a minimum: pure noise
        (1e-6, 1e3, 32, 4096),  # deep in the noise-dominated regime, B_simple = 1e9
        (3.0, 12.0, 0.5, 1.5),  # non-integer "batch sizes" (e.g. token-weighted)
    ],
)
def test_expectations_give_back_grad_sq_and_trace(
    grad_sq: float, trace_sigma: float, b_small: float, b_big: float
) -> None:
    # Both estimators are linear in the two norms and exact on their expectations.
    g_small_sq = expected_sq_norm(grad_sq, trace_sigma, b_small)
    g_big_sq = expected_sq_norm(grad_sq, trace_sigma, b_big)
    est_grad_sq, est_trace = two_batch_estimates(g_small_sq, g_big_sq, b_small, b_big)
    assert est_grad_sq == pytest.approx(grad_sq, rel=1e-9, abs=1e-12)
    assert est_trace == pytest.approx(trace_sigma, rel=1e-9, abs=1e-9)


def test_tensors_are_estimated_elementwise() -> None:
    # Device tensors in, device tensors out, one estimate per element (no host sync).
    grad_sq = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    trace = torch.tensor([10.0, 100.0, 0.0], dtype=torch.float64)
    est_grad_sq, est_trace = two_batch_estimates(grad_sq + trace / 4, grad_sq + trace / 32, 4, 32)
    assert isinstance(est_grad_sq, torch.Tensor) and isinstance(est_trace, torch.Tensor)
    torch.testing.assert_close(est_grad_sq, grad_sq)
    torch.testing.assert_close(est_trace, trace)


@pytest.mark.parametrize(("b_small", "b_big"), [(8, 8), (16, 8), (0, 8), (-1, 8)])
def test_batch_sizes_out_of_order_raise(b_small: int, b_big: int) -> None:
    # Only 0 < b_small < b_big is meaningful; the message names both values.
    with pytest.raises(ValueError, match=f"b_small={b_small} and b_big={b_big}"):
        two_batch_estimates(1.0, 1.0, b_small, b_big)


def test_grad_sq_norm_sums_over_parameters_with_gradients() -> None:
    # |∂L/∂θ|² over all parameters; a parameter without .grad is skipped, not an error.
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, 2))
    c = nn.Parameter(torch.zeros(5))
    a.grad = torch.tensor([1.0, 2.0, 2.0])
    b.grad = torch.tensor([[0.0, 3.0], [0.0, 4.0]])
    assert grad_sq_norm([a, b, c]).item() == pytest.approx(9.0 + 25.0)


def test_grad_sq_norm_without_any_gradient_raises() -> None:
    # Called before backward(): said plainly.
    with pytest.raises(ValueError, match="backward"):
        grad_sq_norm([nn.Parameter(torch.zeros(3))])


def feed(
    noise: NoiseScaleWindow, step: int, grad_sq: float, trace_sigma: float, b_small: int = 4, b_big: int = 32
) -> None:
    noise.update(
        torch.tensor(expected_sq_norm(grad_sq, trace_sigma, b_small)),
        torch.tensor(expected_sq_norm(grad_sq, trace_sigma, b_big)),
        b_small,
        b_big,
        step,
    )


def read_back(noise: NoiseScaleWindow) -> list[tuple[int, float, float]]:
    """What the loop does at a logging point: one copy of the pending values, handed back."""
    pending = noise.pending()
    return noise.receive(torch.stack(pending).tolist() if pending else [])


def test_each_measurement_is_logged_as_measured_at_its_step() -> None:
    # The raw two-batch estimates come back per measurement, negative |G|² included.
    noise = NoiseScaleWindow(window=100)
    feed(noise, 3, grad_sq=2.0, trace_sigma=50.0)
    feed(noise, 7, grad_sq=-0.5, trace_sigma=10.0)
    rows = read_back(noise)
    assert [r[0] for r in rows] == [3, 7]
    assert rows[0][1:] == pytest.approx((2.0, 50.0), rel=1e-5)
    assert rows[1][1:] == pytest.approx((-0.5, 10.0), rel=1e-4)
    assert noise.pending() == []


def test_window_reads_the_ratio_of_means_of_its_steps() -> None:
    # Measurements at steps 10, 20, 30 with window 15 at step 30: only 20 and 30 count, and
    # B_simple = mean tr Σ / mean |G|² = (10 + 12)/(1 + 1.2) = 10.
    noise = NoiseScaleWindow(window=15)
    feed(noise, 10, grad_sq=5.0, trace_sigma=1.0)
    feed(noise, 20, grad_sq=1.0, trace_sigma=10.0)
    feed(noise, 30, grad_sq=1.2, trace_sigma=12.0)
    read_back(noise)
    read = noise.read(30)
    assert read["gns/b_simple"] == pytest.approx(10.0, rel=1e-5)
    # Both measurements sit exactly on the ratio: no spread around it, no error.
    assert read["gns/b_simple_se"] == pytest.approx(0.0, abs=1e-4)


def test_negative_reads_stay_in_the_means() -> None:
    # A negative |G|² estimate is noise, not an error: dropping it would bias |G|² upwards.
    noise = NoiseScaleWindow(window=100)
    reads = [1.0, -0.2, 1.2, 1.0, 1.1, 0.9]  # mean 5/6, 3.9 standard errors above 0
    for step, g in enumerate(reads, start=1):
        feed(noise, step, grad_sq=g, trace_sigma=40.0)
    read_back(noise)
    assert noise.read(6)["gns/b_simple"] == pytest.approx(40.0 / (5 / 6), rel=1e-4)


def test_a_window_whose_gradient_is_lost_in_the_noise_reads_nothing() -> None:
    # Mean |G|² = 0.5 with a standard error of 0.87: B_simple has no upper bound at this precision,
    # and a ratio with a delta-method error would look precise while meaning nothing.
    noise = NoiseScaleWindow(window=100)
    for step, g in enumerate([2.0, -1.0, 2.0, -1.0], start=1):
        feed(noise, step, grad_sq=g, trace_sigma=40.0)
    read_back(noise)
    assert noise.read(4) == {}


def test_an_undefined_window_reads_no_b_simple() -> None:
    # Mean |G|² ≤ 0 over the window: B_simple is undefined and not logged.
    noise = NoiseScaleWindow(window=100)
    feed(noise, 1, grad_sq=-1.0, trace_sigma=10.0)
    feed(noise, 2, grad_sq=0.5, trace_sigma=10.0)
    read_back(noise)
    assert "gns/b_simple" not in noise.read(2)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_measurements_are_dropped(bad: float) -> None:
    # An fp16 step whose gradient overflowed is not a read of the noise.
    noise = NoiseScaleWindow(window=100)
    feed(noise, 1, grad_sq=1.0, trace_sigma=10.0)
    noise.update(torch.tensor(bad), torch.tensor(1.0), 4, 32, 2)
    assert [r[0] for r in read_back(noise)] == [1]
    assert noise.read(2)["gns/b_simple"] == pytest.approx(10.0, rel=1e-5)


def test_nothing_measured_reads_nothing() -> None:
    assert NoiseScaleWindow(window=10).read(5) == {}


def test_the_window_survives_a_checkpoint() -> None:
    noise = NoiseScaleWindow(window=100)
    feed(noise, 1, grad_sq=1.0, trace_sigma=10.0)
    feed(noise, 2, grad_sq=3.0, trace_sigma=50.0)
    read_back(noise)
    restored = NoiseScaleWindow(window=100)
    restored.load_state_dict(noise.state_dict())
    assert restored.read(2) == pytest.approx(noise.read(2))


@pytest.mark.parametrize(
    ("grad_sq", "trace", "expected"),
    [
        ([1.0, 3.0], [10.0, 30.0], (10.0, 0.0)),
        ([2.0], [8.0], (4.0, math.nan)),  # one measurement: no error
        ([-1.0, 0.5], [5.0, 5.0], (math.nan, math.nan)),  # mean |G|² ≤ 0: undefined
        ([], [], (math.nan, math.nan)),
    ],
)
def test_ratio_of_means(grad_sq: list[float], trace: list[float], expected: tuple[float, float]) -> None:
    got = ratio_of_means(grad_sq, trace)
    assert got == pytest.approx(expected, nan_ok=True, abs=1e-12)


def test_ratio_of_means_stderr_is_the_delta_method() -> None:
    # R = 10/2 = 5; residuals t − R·g = (-5, 5) about 0: s = sqrt(50), SE = s/sqrt(2)/2 = 2.5.
    assert ratio_of_means([1.0, 3.0], [0.0, 20.0]) == pytest.approx((5.0, 2.5))


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_positive(window: int) -> None:
    with pytest.raises(ValueError, match=f"window={window}"):
        NoiseScaleWindow(window=window)

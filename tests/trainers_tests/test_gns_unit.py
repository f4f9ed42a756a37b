"""The two-batch estimators and their EMA on inputs whose answer is known exactly.

For a batch mean of B i.i.d. per-example gradients, E|G_B|² = |G|² + tr(Σ)/B. Feeding
that expectation at two batch sizes must give back |G|² and tr(Σ) exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainers.gns import NoiseScaleEMA, grad_sq_norm, two_batch_estimates

CPU = torch.device("cpu")


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


def feed(noise: NoiseScaleEMA, grad_sq: float, trace_sigma: float, b_small: int = 4, b_big: int = 32) -> None:
    noise.update(
        torch.tensor(expected_sq_norm(grad_sq, trace_sigma, b_small)),
        torch.tensor(expected_sq_norm(grad_sq, trace_sigma, b_big)),
        b_small,
        b_big,
    )


def test_ema_after_one_update_reads_that_update() -> None:
    # Bias correction: a single measurement is read back as is, not shrunk by (1 − β).
    noise = NoiseScaleEMA(CPU, beta=0.9)
    feed(noise, grad_sq=2.0, trace_sigma=50.0)
    read = noise.read()
    assert read["gns/grad_sq"] == pytest.approx(2.0, rel=1e-5)
    assert read["gns/trace_sigma"] == pytest.approx(50.0, rel=1e-5)
    assert read["gns/b_simple"] == pytest.approx(25.0, rel=1e-5)


def test_ema_smooths_numerator_and_denominator_separately() -> None:
    # Two updates (|G|², tr Σ) = (1, 10) then (3, 10) at β = 0.5 weigh 1/3 and 2/3:
    # |G|² = 7/3, tr Σ = 10, B_simple = 30/7 — not the EMA of the ratios 10 and 10/3.
    noise = NoiseScaleEMA(CPU, beta=0.5)
    feed(noise, grad_sq=1.0, trace_sigma=10.0)
    feed(noise, grad_sq=3.0, trace_sigma=10.0)
    read = noise.read()
    assert read["gns/grad_sq"] == pytest.approx(7.0 / 3.0, rel=1e-5)
    assert read["gns/trace_sigma"] == pytest.approx(10.0, rel=1e-5)
    assert read["gns/b_simple"] == pytest.approx(30.0 / 7.0, rel=1e-5)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_ema_skips_non_finite_updates(bad: float) -> None:
    # An fp16 step whose gradient overflowed leaves the averages and their weight as
    # they were: the reading equals that of the finite updates alone.
    clean = NoiseScaleEMA(CPU, beta=0.8)
    noisy = NoiseScaleEMA(CPU, beta=0.8)
    for grad_sq, trace in [(1.0, 10.0), (2.0, 30.0)]:
        feed(clean, grad_sq, trace)
        feed(noisy, grad_sq, trace)
        noisy.update(torch.tensor(bad), torch.tensor(1.0), 4, 32)
        noisy.update(torch.tensor(1.0), torch.tensor(bad), 4, 32)
    assert noisy.read() == pytest.approx(clean.read(), rel=1e-6)


def test_ema_with_only_non_finite_updates_reads_nothing() -> None:
    # Nothing valid measured yet: no numbers rather than 0/0.
    noise = NoiseScaleEMA(CPU)
    noise.update(torch.tensor(math.nan), torch.tensor(1.0), 4, 32)
    assert noise.read() == {}


def test_ema_before_any_update_reads_nothing() -> None:
    assert NoiseScaleEMA(CPU).read() == {}


def test_ema_leaves_out_b_simple_when_grad_sq_is_not_positive() -> None:
    # Early in training |G|² can come out ≤ 0; the parts are reported, the ratio is not.
    noise = NoiseScaleEMA(CPU)
    feed(noise, grad_sq=-0.5, trace_sigma=10.0)
    read = noise.read()
    assert read["gns/grad_sq"] == pytest.approx(-0.5, rel=1e-5)
    assert "gns/b_simple" not in read


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_ema_rejects_beta_outside_unit_interval(beta: float) -> None:
    with pytest.raises(ValueError, match=f"beta={beta}"):
        NoiseScaleEMA(CPU, beta=beta)

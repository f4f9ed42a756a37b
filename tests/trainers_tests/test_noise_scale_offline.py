"""The gradient noise scale against values known exactly.

Linear regression with Gaussian inputs has a closed form. Take x ~ N(0, I_d),
y = w*·x + ε with ε ~ N(0, σ²), the per-example loss ½(w·x − y)² (the mean of it over
a batch is the loss), and weights w = w* + δ. The per-example gradient is
g = (w·x − y)·x = (δ·x − ε)·x, so

    G     = E[g] = E[x xᵀ]δ − E[ε]E[x] = δ
    E|g|² = E[(δ·x)²|x|²] + σ²·E|x|²                (the cross term has E[ε] = 0)
          = (d + 2)|δ|² + dσ²                        (Isserlis: E[x_a x_b x_j²] = δ_ab + 2δ_aj δ_bj)
    tr Σ  = E|g|² − |G|² = d(|δ|² + σ²) + |δ|²

and B_simple = (d(|δ|² + σ²) + |δ|²)/|δ|². With d = 100, |δ| = σ = 1 that is 201.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from batchscope.trainers.noise_scale_offline import NoiseScaleEstimate, _summarize, measure_noise_scale


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # These tensors are tiny: with a second thread the time goes to synchronizing the
    # two, and on a busy 2-core machine a step takes 10× longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


@dataclass
class LinearRegression:
    model: nn.Linear
    x: torch.Tensor
    y: torch.Tensor
    delta: torch.Tensor
    sigma: float

    @property
    def exact_b_simple(self) -> float:
        d = self.x.shape[1]
        delta_sq = float(self.delta @ self.delta)
        return (d * (delta_sq + self.sigma**2) + delta_sq) / delta_sq


def linear_regression(d: int = 100, n: int = 100_000, sigma: float = 1.0, seed: int = 0) -> LinearRegression:
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = x @ w_star + sigma * torch.randn(n, generator=gen)
    delta = torch.randn(d, generator=gen)
    delta /= delta.norm()
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    return LinearRegression(model, x, y, delta, sigma)


def test_exact_value_matches_per_example_gradients_of_the_sample() -> None:
    # Checks the derivation above: the sample's own tr Σ/|G|², from its per-example
    # gradients, is within sampling error (about 1% at n = 100 000) of the closed form.
    problem = linear_regression()
    w = problem.model.weight.detach()[0]
    g = (problem.x @ w - problem.y)[:, None] * problem.x
    mean = g.mean(0)
    sample_b_simple = float(((g - mean) ** 2).sum(1).mean() / (mean @ mean))
    assert problem.exact_b_simple == pytest.approx(201.0)
    assert sample_b_simple == pytest.approx(problem.exact_b_simple, rel=0.03)


def test_linear_regression_estimate_is_within_10_percent_of_exact() -> None:
    # Exact 201 (the sample's own value 201.3); measured 205 ± 4.4 with seed 0.
    problem = linear_regression()
    estimate = measure_noise_scale(
        problem.model, half_squared_error, problem.x, problem.y, b_small=64, b_big=1024, n_batches=400
    )
    assert estimate.b_simple == pytest.approx(problem.exact_b_simple, rel=0.10)
    # The parts, too: |G|² = |δ|² = 1 and tr Σ = 201.
    assert estimate.grad_sq == pytest.approx(1.0, rel=0.10)
    assert estimate.trace_sigma == pytest.approx(201.0, rel=0.10)
    assert estimate.b_simple_stderr < 0.05 * estimate.b_simple


def test_default_draws_pairs_until_the_estimate_is_within_10_percent() -> None:
    # With b_big = 128 below B_simple = 201 the |G|² estimate is noisy and ±10% takes far
    # more than 32 pairs; with seed 0 it stops at 192 pairs reading 204 ± 19.5 (±9.5%).
    problem = linear_regression()
    estimate = measure_noise_scale(problem.model, half_squared_error, problem.x, problem.y, b_small=16, b_big=128)
    assert abs(estimate.b_simple - problem.exact_b_simple) < 3 * estimate.b_simple_stderr
    assert estimate.rel_stderr == pytest.approx(estimate.b_simple_stderr / estimate.b_simple)
    assert (estimate.precision_reached and estimate.rel_stderr <= 0.10) or (
        estimate.precision_reached is False and estimate.n_batches == 1024
    )
    assert 32 < estimate.n_batches <= 1024


def test_stopping_after_n_pairs_gives_what_n_fixed_pairs_give() -> None:
    # The sequential run draws the same pairs as a fixed one, in the same order.
    problem = linear_regression(d=20, n=5000)
    args = (problem.model, half_squared_error, problem.x, problem.y)
    sequential = measure_noise_scale(*args, b_small=4, b_big=32, seed=1)
    fixed = measure_noise_scale(*args, b_small=4, b_big=32, seed=1, n_batches=sequential.n_batches)
    assert sequential.n_batches > 32
    assert fixed.b_simple == pytest.approx(sequential.b_simple, rel=1e-12)
    assert fixed.b_simple_stderr == pytest.approx(sequential.b_simple_stderr, rel=1e-12)


@pytest.mark.parametrize("n_batches", [2, 40, 100])
def test_fixed_n_batches_draws_exactly_that_many_pairs(n_batches: int) -> None:
    # A fixed count is honoured whatever the precision: 32 pairs would already give ±10%
    # here (b_big = 1024 ≫ B_simple / 8), and 2 pairs give far less. No target, no verdict.
    problem = linear_regression(n=20_000)
    estimate = measure_noise_scale(
        problem.model, half_squared_error, problem.x, problem.y, b_small=64, b_big=1024, n_batches=n_batches
    )
    assert estimate.n_batches == n_batches
    assert estimate.precision_reached is None


def test_target_not_reached_stops_at_max_batches() -> None:
    # Least squares fitted exactly: |G|² = 0 while tr Σ = d·σ² > 0, so the relative error
    # of B_simple stays large; the search gives up at max_batches (not a multiple of 32).
    problem = linear_regression(d=10, n=2000)
    w = torch.linalg.lstsq(problem.x.double(), problem.y.double()[:, None]).solution
    with torch.no_grad():
        problem.model.weight.copy_(w.T)
    estimate = measure_noise_scale(
        problem.model, half_squared_error, problem.x, problem.y, b_small=4, b_big=32, max_batches=50
    )
    assert estimate.precision_reached is False
    assert estimate.n_batches == 50


def test_zero_gradient_gives_nan_at_max_batches() -> None:
    # Every per-example gradient is exactly zero (a perfect fit): |G|² = tr Σ = 0 and
    # B_simple = 0/0. NaN is never precise enough, so all max_batches pairs are drawn.
    model = nn.Linear(3, 1, bias=False)
    nn.init.zeros_(model.weight)
    x, y = torch.randn(200, 3), torch.zeros(200)
    estimate = measure_noise_scale(model, half_squared_error, x, y, b_small=4, b_big=16, max_batches=40)
    assert math.isnan(estimate.b_simple)
    assert math.isnan(estimate.rel_stderr)
    assert estimate.precision_reached is False
    assert estimate.n_batches == 40


def mlp_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small classifier a few full-batch steps into training, where B_simple ≈ 90."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=gen)
    teacher = torch.randn(8, 3, generator=gen)
    y = (x @ teacher + torch.randn(2000, 3, generator=gen)).argmax(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, x, y


def exact_b_simple(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr Σ/|G|² over the whole dataset, from every per-example gradient."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.reshape(len(x), -1) for v in per_example.values()], dim=1).double()
    mean = g.mean(0)
    return float(((g - mean) ** 2).sum(1).mean() / (mean @ mean))


def test_mlp_estimate_is_within_15_percent_of_per_example_value() -> None:
    # Exact 91.6 from the 2000 per-example gradients; measured 96.2 ± 3.2 with seed 0.
    model, x, y = mlp_problem()
    exact = exact_b_simple(model, x, y)
    estimate = measure_noise_scale(model, nn.functional.cross_entropy, x, y, b_small=8, b_big=512, n_batches=300)
    assert 50 < exact < 200  # the regime the test is meant for: b_small < B_simple < b_big
    assert estimate.b_simple == pytest.approx(exact, rel=0.15)


def test_stderr_matches_spread_over_seeds() -> None:
    # The delta-method standard error of one measurement should match the spread of
    # repeated measurements (spread 14.0 vs mean stderr 12.6; allowed ratio 0.6–1.6).
    problem = linear_regression(n=20_000)
    estimates = [
        measure_noise_scale(
            problem.model, half_squared_error, problem.x, problem.y,
            b_small=64, b_big=1024, n_batches=40, seed=seed,
        )
        for seed in range(30)
    ]  # fmt: skip
    spread = torch.tensor([e.b_simple for e in estimates]).std().item()
    mean_stderr = sum(e.b_simple_stderr for e in estimates) / len(estimates)
    assert 0.6 < spread / mean_stderr < 1.6


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def test_model_weights_buffers_grads_and_mode_are_left_as_found() -> None:
    # Measuring is not training: no weight, running statistic or existing .grad changes,
    # train mode comes back, and the global RNG is not consumed.
    torch.manual_seed(0)
    model = WithBatchNorm().train()
    x, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
    nn.functional.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    rng_before = torch.get_rng_state()

    measure_noise_scale(model, nn.functional.cross_entropy, x, y, b_small=4, b_big=64, n_batches=4)

    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    grads_after = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads_after) == len(grads_before)
    assert all(torch.equal(a, b) for a, b in zip(grads_after, grads_before, strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_micro_batches_give_the_same_result() -> None:
    # Splitting the big batch only bounds memory: same seed, same numbers up to rounding.
    problem = linear_regression(d=20, n=5000)
    args = (problem.model, half_squared_error, problem.x, problem.y)
    whole = measure_noise_scale(*args, b_small=16, b_big=512, n_batches=8, seed=3)
    pieces = measure_noise_scale(*args, b_small=16, b_big=512, n_batches=8, seed=3, micro_batch_size=100)
    assert pieces.b_simple == pytest.approx(whole.b_simple, rel=1e-4)
    assert pieces.grad_sq == pytest.approx(whole.grad_sq, rel=1e-4)


@pytest.mark.parametrize(
    ("grad_sq", "trace", "expected"),
    [
        # Ratio of the means, (10 + 30)/(1 + 3) …
        ([1.0, 3.0], [10.0, 30.0], 10.0),
        # … not the mean of the ratios, which would be (1 + 50)/2 = 25.5.
        ([1.0, 2.0], [1.0, 100.0], 101.0 / 3.0),
        # |G|² averaging to ≤ 0: the gradient is lost in the noise, B_simple undefined.
        ([-1.0, 0.5], [10.0, 10.0], math.nan),
        ([0.0, 0.0], [10.0, 10.0], math.nan),
    ],
)
def test_per_batch_estimates_are_averaged_before_dividing(
    grad_sq: list[float], trace: list[float], expected: float
) -> None:
    summary = _summarize(torch.tensor(grad_sq), torch.tensor(trace), b_small=1, b_big=2)
    assert summary.b_simple == pytest.approx(expected, nan_ok=True)
    assert summary.grad_sq == pytest.approx(sum(grad_sq) / len(grad_sq))
    assert summary.trace_sigma == pytest.approx(sum(trace) / len(trace))


@pytest.mark.parametrize(
    ("b_simple", "stderr", "expected"),
    [
        (200.0, 20.0, 0.1),
        # A negative tr Σ estimate makes B_simple negative; the error is still relative to its size.
        (-50.0, 10.0, 0.2),
        (0.0, 10.0, math.inf),
        (math.nan, math.nan, math.nan),
    ],
)
def test_relative_stderr(b_simple: float, stderr: float, expected: float) -> None:
    estimate = NoiseScaleEstimate(b_simple, stderr, 1.0, 0.1, b_simple, stderr, n_batches=2, b_small=1, b_big=2)
    assert estimate.rel_stderr == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"b_small": 0, "b_big": 8}, "b_small=0"),
        ({"b_small": 8, "b_big": 8}, "b_small=8 and b_big=8"),
        ({"b_small": 16, "b_big": 8}, "b_small=16 and b_big=8"),
        ({"b_small": 4, "b_big": 101}, "b_big=101"),
        ({"b_small": 4, "b_big": 8, "n_batches": 1}, "n_batches=1"),
        ({"b_small": 4, "b_big": 8, "rel_precision": 0.0}, "rel_precision=0.0"),
        ({"b_small": 4, "b_big": 8, "rel_precision": -0.1}, "rel_precision=-0.1"),
        ({"b_small": 4, "b_big": 8, "rel_precision": math.nan}, "rel_precision=nan"),
        ({"b_small": 4, "b_big": 8, "min_batches": 1}, "min_batches=1"),
        ({"b_small": 4, "b_big": 8, "max_batches": 16}, "max_batches=16 and min_batches=32"),
        ({"b_small": 4, "b_big": 8, "micro_batch_size": 0}, "micro_batch_size=0"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    # Every bad argument is a ValueError whose message shows the value given.
    model = nn.Linear(3, 1)
    x, y = torch.randn(100, 3), torch.randn(100)
    with pytest.raises(ValueError, match=message):
        measure_noise_scale(model, half_squared_error, x, y, **kwargs)


def test_mismatched_lengths_raise() -> None:
    # x and y of different lengths are reported with both lengths.
    with pytest.raises(ValueError, match=r"len\(x\)=100 and len\(y\)=99"):
        measure_noise_scale(
            nn.Linear(3, 1), half_squared_error, torch.randn(100, 3), torch.randn(99), b_small=4, b_big=8
        )


def test_model_without_trainable_parameters_raises() -> None:
    # Nothing to differentiate: said at once rather than failing inside autograd.
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter"):
        measure_noise_scale(model, half_squared_error, torch.randn(100, 3), torch.randn(100), b_small=4, b_big=8)

"""Power iteration for the top Hessian eigenvalue, on losses whose Hessian is known."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from batchscope.trainers.sharpness import top_hessian_eigenvalue
from batchscope.trainers.task import LossFn


class Vector(nn.Module):
    """A model that is just a parameter vector θ; it ignores its input."""

    def __init__(self, dim: int, hidden_unused: bool = False) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(dim, generator=torch.Generator().manual_seed(1)))
        if hidden_unused:
            self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta


def symmetric_with_eigenvalues(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """A = Q diag(λ) Qᵀ with a random orthogonal Q, so the eigenvectors are not axis-aligned."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    return (q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T).float()


def quadratic(a: torch.Tensor) -> LossFn:
    """L(θ) = ½ θᵀAθ, whose Hessian is A everywhere."""

    def loss_fn(theta: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        return 0.5 * theta @ a @ theta

    return loss_fn


NO_DATA = torch.zeros(1)


@pytest.mark.parametrize(
    "eigenvalues",
    [
        [5.0, 2.0, 1.0, 0.5],
        [10.0, 3.0, 3.0, 1.0, 0.1, 0.0, -1.0],  # repeated, zero and negative eigenvalues below the top
        [100.0] + [1.0] * 30,  # one sharp direction among many flat ones
    ],
)
def test_quadratic_top_eigenvalue_is_recovered(eigenvalues: list[float]) -> None:
    # The value is the largest eigenvalue of A (from eigvalsh) to within the tolerance.
    a = symmetric_with_eigenvalues(eigenvalues)
    exact = torch.linalg.eigvalsh(a.double())[-1].item()
    tol = 1e-4
    sharp = top_hessian_eigenvalue(Vector(len(eigenvalues)), quadratic(a), NO_DATA, NO_DATA, max_iters=100, tol=tol)
    assert sharp.converged
    assert sharp.value == pytest.approx(exact, rel=10 * tol)


def test_negative_eigenvalue_of_largest_magnitude_is_returned_with_its_sign() -> None:
    # Power iteration finds the largest |λ|: a saddle with λ = −6 beats λ = 3.
    a = symmetric_with_eigenvalues([-6.0, 3.0, 1.0])
    sharp = top_hessian_eigenvalue(Vector(3), quadratic(a), NO_DATA, NO_DATA, max_iters=100, tol=1e-5)
    assert sharp.converged
    assert sharp.value == pytest.approx(-6.0, rel=1e-3)


def test_linear_regression_hessian_is_the_input_second_moment() -> None:
    # For mean ½(w·x + b − y)² the Hessian in (w, b) is [X 1]ᵀ[X 1]/n exactly, whatever w.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2]) + 0.5
    y = torch.randn(256, generator=gen)
    model = nn.Linear(5, 1)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()

    design = torch.cat([x, torch.ones(256, 1)], dim=1).double()
    exact = torch.linalg.eigvalsh(design.T @ design / len(x))[-1].item()
    sharp = top_hessian_eigenvalue(model, loss_fn, x, y, max_iters=100, tol=1e-5)
    assert sharp.converged
    assert sharp.value == pytest.approx(exact, rel=1e-3)


def test_stops_unconverged_when_out_of_iterations() -> None:
    # Two nearly equal top eigenvalues need many products; with 3 the answer is not claimed.
    a = symmetric_with_eigenvalues([1.0, 0.999, 0.5])
    sharp = top_hessian_eigenvalue(Vector(3), quadratic(a), NO_DATA, NO_DATA, max_iters=3, tol=1e-9)
    assert not sharp.converged
    assert sharp.iterations == 3


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(training: bool) -> None:
    # Evaluated in eval mode, then handed back in the mode it came in.
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).train(training)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    top_hessian_eigenvalue(model, nn.functional.mse_loss, x, y, max_iters=3)
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_weights_and_grads_are_untouched() -> None:
    # Hessian-vector products go through autograd.grad: no .grad is written, no weight moves.
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    top_hessian_eigenvalue(model, nn.functional.mse_loss, torch.randn(32, 4), torch.randn(32, 1), max_iters=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_works_inside_no_grad() -> None:
    # Often called from evaluation code that runs under torch.no_grad().
    a = symmetric_with_eigenvalues([4.0, 1.0])
    with torch.no_grad():
        sharp = top_hessian_eigenvalue(Vector(2), quadratic(a), NO_DATA, NO_DATA, max_iters=100, tol=1e-5)
    assert sharp.value == pytest.approx(4.0, rel=1e-3)


def test_unused_parameter_adds_only_zero_eigenvalues() -> None:
    # A parameter the loss never touches is a zero row and column of the Hessian.
    a = symmetric_with_eigenvalues([4.0, 1.0])
    model = Vector(2, hidden_unused=True)
    sharp = top_hessian_eigenvalue(model, quadratic(a), NO_DATA, NO_DATA, max_iters=100, tol=1e-5)
    assert sharp.value == pytest.approx(4.0, rel=1e-3)


def test_loss_linear_in_parameters_has_zero_sharpness() -> None:
    # L = c·θ has a zero Hessian: reported as 0, converged, without any product.
    model = Vector(3)
    sharp = top_hessian_eigenvalue(
        model, lambda theta, _: (theta * torch.tensor([1.0, 2.0, 3.0])).sum(), NO_DATA, NO_DATA
    )
    assert sharp.value == 0.0
    assert sharp.converged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_iters": 0}, "max_iters=0"), ({"tol": 0.0}, "tol=0.0"), ({"tol": -1.0}, "tol=-1.0")],
)
def test_bad_arguments_raise_naming_the_value(kwargs: dict[str, Any], message: str) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=message):
        top_hessian_eigenvalue(model, nn.functional.mse_loss, torch.randn(4, 2), torch.randn(4, 1), **kwargs)

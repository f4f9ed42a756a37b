"""Sharpness: the top eigenvalue of the loss Hessian, by power iteration on Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from batchscope.trainers.task import LossFn


@dataclass(frozen=True)
class Sharpness:
    value: float
    iterations: int
    converged: bool


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> Sharpness:
    """Largest-magnitude eigenvalue λ of ∇²L(θ) over the batch (x, y), L = loss_fn(model(x), y).

    See `top_hessian_eigenvalue_of`.
    """
    return top_hessian_eigenvalue_of(model, lambda m: loss_fn(m(x), y), max_iters=max_iters, tol=tol, seed=seed)


def top_hessian_eigenvalue_of(
    model: nn.Module,
    loss_of: Callable[[nn.Module], torch.Tensor],
    *,
    max_iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> Sharpness:
    """Largest-magnitude eigenvalue λ of ∇²L(θ), L = loss_of(model) (any batch structure, any step).

    Stops when |λ_k − λ_{k−1}| ≤ tol·|λ_k| or after `max_iters` products. The model
    is evaluated in eval mode (BatchNorm uses its running statistics) and in fp32.
    Gradients are enabled inside, so it may be called from a `torch.no_grad()` block;
    parameters the loss does not depend on contribute zero rows to the Hessian.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters=}.")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol=}.")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires a gradient.")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = loss_of(model)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # A gradient that does not depend on θ (parameter unused, or entering the loss
            # linearly) is a zero row, and by symmetry a zero column, of the Hessian: the
            # spectrum's non-zero part lives on the other parameters only.
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not live:
                return Sharpness(0.0, 0, True)
            params = [params[i] for i in live]
            live_grads = [grads[i] for i in live]
            gen = torch.Generator(device="cpu").manual_seed(seed)
            v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
            v = _normalize(v)
            value = 0.0
            for k in range(1, max_iters + 1):
                hv = torch.autograd.grad(
                    live_grads,
                    params,
                    grad_outputs=v,
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
                new = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))  # Rayleigh quotient
                v = _normalize(list(hv))
                if k > 1 and abs(new - value) <= tol * max(abs(new), 1e-12):
                    return Sharpness(new, k, True)
                value = new
            return Sharpness(value, max_iters, False)
    finally:
        model.train(was_training)


def _normalize(vs: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((t * t).sum() for t in vs))  # type: ignore[arg-type]
    return [t / (norm + 1e-12) for t in vs]

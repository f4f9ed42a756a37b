"""Precision's step functions, decided once: the same updates as autocast + GradScaler written out."""

from __future__ import annotations

import pytest
import torch

from batchscope.trainers.device import make_precision
from tests.trainers_tests.test_memory import _cpu_fp16_supported

NO_CPU_FP16 = pytest.mark.skipif(not _cpu_fp16_supported(), reason="this torch has no fp16 autocast on CPU")
PRECISIONS = ["fp32", "bf16", pytest.param("fp16", marks=NO_CPU_FP16)]


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _loss_of(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)


@pytest.mark.parametrize("name", PRECISIONS)
def test_the_step_functions_update_like_autocast_and_the_scaler_written_out(name: str) -> None:
    cpu = torch.device("cpu")
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    # Written out, as a hand-written loop does it.
    precision = make_precision(name, cpu)
    model, opt = _model_and_optimizer()
    for _ in range(3):
        opt.zero_grad()
        with precision.autocast():
            loss = _loss_of(model, batch)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(opt)
        precision.scaler.update()
    # Decided once.
    decided = make_precision(name, cpu)
    same, same_opt = _model_and_optimizer()
    forward, backward, step = decided.autocast_loss(_loss_of), decided.backward(), decided.optimizer_step(same_opt)
    for _ in range(3):
        same_opt.zero_grad()
        backward(forward(same, batch))
        step()
    for p, q in zip(model.parameters(), same.parameters(), strict=True):
        assert torch.equal(p, q)
    assert decided.scaler.get_scale() == precision.scaler.get_scale()


def test_fp32_pays_no_autocast_and_no_scaler_calls() -> None:
    precision = make_precision("fp32", torch.device("cpu"))
    _, opt = _model_and_optimizer()
    assert precision.autocast_loss(_loss_of) is _loss_of
    assert precision.backward() is torch.Tensor.backward
    assert precision.optimizer_step(opt).__name__ == "unwrapped_step"  # optim.step_function

"""The reference: a bare PyTorch training loop with nothing on top.

Same model, same device-resident data, same batch order mechanism, same optimizer
as batchscope's loop, but no logging, no evaluation, no noise scale, and the loss
is never read back. Timed with a synchronize at the end only.

`on_step` turns it into the hand-written loops people write around it (read the
loss, log it to MLflow): the bare loop passes None, and pays one `is None` test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from batchscope.trainers.device import make_precision, resolve_device, resolve_precision, seed_everything
from batchscope.trainers.loop import make_optimizer
from batchscope.trainers.recipes import build_task
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import Task
from benchmarks.common import Timing

OnStep = Callable[[int, torch.Tensor], None]
OptimizerFactory = Callable[[TrainSpec, torch.nn.Module, float], torch.optim.Optimizer]


def build(spec: TrainSpec) -> Task:
    device = resolve_device(spec.device)
    seed_everything(spec.seed)
    return build_task(spec.recipe, spec.model, spec.recipe_options, device)


def torch_default_optimizer(spec: TrainSpec, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer as a hand-written loop creates it: torch's default implementation (not fused on the CPU)."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=spec.weight_decay)


def bare_loop(
    spec: TrainSpec,
    task: Task,
    steps: int,
    on_step: OnStep | None = None,
    optimizer_factory: OptimizerFactory = make_optimizer,
) -> Timing:
    """Wall and CPU seconds for `steps` optimizer steps (after a short warm-up).

    The optimizer is batchscope's (`make_optimizer`: fused kernels) unless `optimizer_factory` says otherwise.
    """
    device = task.train_x.device
    precision = make_precision(resolve_precision(spec.precision, device), device)
    model = task.model
    optimizer = optimizer_factory(spec, model, spec.lr)
    scaler = precision.scaler
    n, b = task.num_train, spec.batch_size
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    done = 0

    def run(k: int) -> None:
        nonlocal done
        perm = torch.randperm(n, generator=gen, device=device)
        pos = 0
        for _ in range(k):
            if pos + b > n:
                perm, pos = torch.randperm(n, generator=gen, device=device), 0
            idx = perm[pos : pos + b] if b <= n else torch.randint(0, n, (b,), generator=gen, device=device)
            pos += b
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = task.loss_fn(model(task.train_x[idx]).float(), task.train_y[idx])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done += 1
            if on_step is not None:
                on_step(done, loss)

    model.train()
    run(min(20, steps))  # warm-up: allocator, kernels, autograd graph caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)

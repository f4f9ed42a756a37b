"""What a run measures outside its training steps: validation, the target's crossing, end-of-run metrics.

The loop (trainers/loop.py) calls `evaluate` at its evaluation points and `final_metrics`
once training is over; `target_reached` and `crossing` decide when, between two
evaluations, the run reached its target.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from batchscope.trainers.sharpness import top_hessian_eigenvalue
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import Task

AutocastFactory = Callable[[], AbstractContextManager[Any]]

# Metrics where larger is better; a target on any other metric is reached from above.
HIGHER_IS_BETTER = ("acc",)


def target_reached(metric: str, value: float, target: float) -> bool:
    if any(metric.endswith(s) for s in HIGHER_IS_BETTER):
        return value >= target
    return value <= target


def crossing(
    before: tuple[float, float, float] | None, after: tuple[float, float, float], target: float
) -> tuple[float, float]:
    """(step, training time) at which a metric first reached `target`, between two evaluations.

    `before` is (step, value, time) of the last evaluation short of the target (None: the target
    was reached at the first one, with nothing to interpolate from), `after` the first at or past
    it. The first evaluation past the target is on average half an evaluation interval late,
    and most so for large batches, which take few steps: read as it is, it flattens steps
    against batch size and biases B_crit low (Shallue et al. 2019 measure at every step). The
    crossing is interpolated linearly between the two.
    """
    step, value, time_s = after
    if before is None:
        return float(step), float(time_s)
    step0, value0, time0 = before
    span = value - value0
    frac = 1.0 if span == 0 else min(1.0, max(0.0, (target - value0) / span))
    return step0 + frac * (step - step0), time0 + frac * (time_s - time0)


@torch.no_grad()
def evaluate(
    task: Task, x: torch.Tensor, y: torch.Tensor, autocast: AutocastFactory, chunk: int = 4096
) -> dict[str, float]:
    """Mean loss (and accuracy) over (x, y) in eval mode. One host sync at the end."""
    model = task.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for lo in range(0, len(x), chunk):
        xb, yb = x[lo : lo + chunk], y[lo : lo + chunk]
        with autocast():
            out = model(xb)
        loss_sum += task.loss_fn(out.float(), yb) * len(xb)
        if task.classification:
            correct += (out.argmax(dim=-1) == yb).sum()
    model.train(was_training)
    # Accuracy is per target element: per example for classifiers, per token for sequence models.
    per_target = max(1, y[:1].numel()) * len(x)
    loss_t, correct_t = torch.stack([loss_sum, correct]).tolist()  # host sync: evaluation point
    result = {"loss": loss_t / len(x)}
    if task.classification:
        result["acc"] = correct_t / per_target
    if task.derived_metrics is not None:
        result.update(task.derived_metrics(result))
    return result


def final_metrics(
    spec: TrainSpec,
    task: Task,
    autocast: AutocastFactory,
    best: dict[str, float],
    device: torch.device,
    val: dict[str, float] | None = None,
) -> dict[str, float]:
    """Training loss/accuracy on a fixed subset the size of the validation set, gap, sharpness.

    `val` is the validation result on the final weights where the loop has it already.
    """
    final: dict[str, float] = {}
    n = min(len(task.val_x), task.num_train)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    subset = torch.randperm(task.num_train, generator=gen)[:n].to(device)
    tr = evaluate(task, task.train_x[subset], task.train_y[subset], autocast)
    if val is None:
        val = evaluate(task, task.val_x, task.val_y, autocast)
    final["final/train_loss"] = tr["loss"]
    final["final/val_loss"] = val["loss"]
    final["final/gen_gap"] = val["loss"] - tr["loss"]
    if task.classification:
        final["final/train_acc"] = tr["acc"]
        final["final/val_acc"] = val["acc"]
        final["final/gen_gap_acc"] = tr["acc"] - val["acc"]
    for key in val.keys() - {"loss", "acc"}:  # recipe-derived metrics, e.g. perplexity
        final[f"final/val_{key}"] = val[key]
        final[f"final/train_{key}"] = tr[key]
    if "val/acc" in best:
        final["final/best_val_acc"] = best["val/acc"]
    if "val/loss" in best:
        final["final/best_val_loss"] = best["val/loss"]
    if spec.sharpness:
        m = min(512, n)
        sharp = top_hessian_eigenvalue(
            task.model,
            task.loss_fn,
            task.train_x[subset[:m]],
            task.train_y[subset[:m]],
            max_iters=spec.sharpness_iters,
            tol=spec.sharpness_tol,
            seed=spec.seed,
        )
        final["final/sharpness"] = sharp.value
        final["final/sharpness_iters"] = float(sharp.iterations)
    return final

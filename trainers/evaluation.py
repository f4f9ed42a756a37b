"""What a run measures outside its training steps: validation, the target's crossing, end-of-run metrics.

The loop (trainers/loop.py) calls `evaluate` at its evaluation points and `final_metrics`
once training is over; `target_reached` and `crossing` decide when, between two
evaluations, the run reached its target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils.data import Dataset

from batchscope.trainers.batches import batch_size_of, eval_parts, task_loss
from batchscope.trainers.data import EVAL_CHUNK, train_subset_batches, val_batches
from batchscope.trainers.sharpness import top_hessian_eigenvalue_of
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import DataTask, Task

AutocastFactory = Callable[[], AbstractContextManager[Any]]

# Metrics where larger is better; a target on any other metric is reached from above.
HIGHER_IS_BETTER = ("acc", "accuracy", "bleu", "f1", "auc")


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
    task: Task, x: torch.Tensor, y: torch.Tensor, autocast: AutocastFactory, chunk: int = EVAL_CHUNK
) -> dict[str, float]:
    """Mean loss (and accuracy) over the tensors (x, y) of an in-memory task. One host sync at the end."""
    return evaluate_batches(
        task, lambda: ((x[lo : lo + chunk], y[lo : lo + chunk]) for lo in range(0, len(x), chunk)), autocast
    )[0]


@torch.no_grad()
def evaluate_batches(
    task: Task | DataTask, batches: Callable[[], Iterable[Any]], autocast: AutocastFactory
) -> tuple[dict[str, float], int]:
    """Mean loss (accuracy, the recipe's metrics) over the batches `batches()` gives, in eval mode;
    and the number of examples. One host sync at the end (and what the recipe's metrics take)."""
    model = task.model
    was_training = model.training
    model.eval()
    try:
        losses: list[torch.Tensor] = []
        right: list[torch.Tensor] = []
        n = targets = 0
        for batch in batches():
            k = batch_size_of(batch)
            with autocast():
                loss, correct, n_targets = eval_parts(task, model, batch)
            losses.append(loss.float() * k)
            if correct is not None:
                right.append(correct.float())
            n, targets = n + k, targets + n_targets
        if n == 0:
            raise ValueError("the evaluation set gave no batch; a task needs at least one validation example.")
        sums = torch.stack([torch.stack(losses).sum(), *([torch.stack(right).sum()] if right else [])])
        values = sums.tolist()  # host sync: evaluation point
        result = {"loss": values[0] / n}
        if right:
            # Accuracy is per target element: per example for classifiers, per token for sequence models.
            result["acc"] = values[1] / max(1, targets)
        if isinstance(task, DataTask) and task.metrics is not None:
            result.update({_bare(k): float(v) for k, v in task.metrics(model, batches()).items()})
    finally:
        model.train(was_training)
    if task.derived_metrics is not None:
        result.update(task.derived_metrics(result))
    return result, n


def _bare(key: str) -> str:
    # A recipe may name its metric `bleu` or `val/bleu`: the loop adds the `val/` (or `final/…_`) itself.
    return key.removeprefix("val/")


def validate(task: Task | DataTask, device: torch.device, autocast: AutocastFactory) -> tuple[dict[str, float], int]:
    """The validation metrics (without the `val/` prefix) and the validation set's size."""
    return evaluate_batches(task, lambda: val_batches(task, device), autocast)


def final_metrics(
    spec: TrainSpec,
    task: Task | DataTask,
    autocast: AutocastFactory,
    best: dict[str, float],
    device: torch.device,
    val: dict[str, float] | None = None,
) -> dict[str, float]:
    """Training loss/accuracy on a fixed subset the size of the validation set, gap, sharpness.

    `val` is the validation result on the final weights where the loop has it already.
    """
    final: dict[str, float] = {}
    val_now, n_val = validate(task, device, autocast) if val is None else (val, _val_size(task, device))
    val = val_now
    num_train = task.num_train
    n = n_val if num_train is None else min(n_val, num_train)
    tr, _ = evaluate_batches(task, lambda: train_subset_batches(task, n, device), autocast)
    final["final/train_loss"] = tr["loss"]
    final["final/val_loss"] = val["loss"]
    final["final/gen_gap"] = val["loss"] - tr["loss"]
    if "acc" in val and "acc" in tr:
        final["final/train_acc"] = tr["acc"]
        final["final/val_acc"] = val["acc"]
        final["final/gen_gap_acc"] = tr["acc"] - val["acc"]
    for key in val.keys() - {"loss", "acc"}:  # recipe metrics, e.g. perplexity
        final[f"final/val_{key}"] = val[key]
        if key in tr:
            final[f"final/train_{key}"] = tr[key]
    if "val/acc" in best:
        final["final/best_val_acc"] = best["val/acc"]
    if "val/loss" in best:
        final["final/best_val_loss"] = best["val/loss"]
    if spec.sharpness:
        # Up to 512 examples of the same subset: its first evaluation batch, cut to 512.
        batch = next(iter(train_subset_batches(task, min(512, n), device)))
        sharp = top_hessian_eigenvalue_of(
            task.model,
            lambda m: task_loss(task, m, batch),
            max_iters=spec.sharpness_iters,
            tol=spec.sharpness_tol,
            seed=spec.seed,
        )
        final["final/sharpness"] = sharp.value
        final["final/sharpness_iters"] = float(sharp.iterations)
    return final


def _val_size(task: Task | DataTask, device: torch.device) -> int:
    """The validation set's size without evaluating it (a stream's is counted by reading it)."""
    if isinstance(task, Task):
        return len(task.val_x)
    if isinstance(task.val, Dataset):
        return len(task.val)  # type: ignore[arg-type]
    return sum(batch_size_of(b) for b in task.val())

"""Batches of any structure: a tensor, a tuple/list of tensors, or a dict of tensors.

The loop needs four things of a batch, whatever its structure: how many examples it
holds (the leading dimension, the same in every tensor), rows [lo, hi) of it (micro-batches),
the whole of it on the device, and its mean loss. Non-tensor leaves (a list of strings,
say) travel along untouched and do not count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from batchscope.trainers.task import Batch, DataTask, LossFn, StepFn, Task


def tensors_of(batch: Batch) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the batch; names say where it sits (`[0]`, `input_ids`)."""
    if isinstance(batch, torch.Tensor):
        yield "batch", batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                yield str(k), v
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        for i, v in enumerate(batch):
            if isinstance(v, torch.Tensor):
                yield f"[{i}]", v


def batch_size_of(batch: Batch) -> int:
    """The number of examples: the leading dimension, which every tensor of the batch must share.

    Read from shapes only, so no host sync.
    """
    sizes = {name: t.shape[0] for name, t in tensors_of(batch) if t.ndim > 0}
    if not sizes:
        raise ValueError(
            f"a batch must hold at least one tensor with a leading (example) dimension, got {_describe(batch)}."
        )
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise ValueError(
            f"batch tensors have inconsistent leading dimensions ({shown}); every tensor of a batch "
            "must have one row per example (the batch size first)."
        )
    return next(iter(sizes.values()))


def slice_batch(batch: Batch, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of every tensor (views: no copy); other leaves are kept whole."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, Mapping):
        return {k: _rows(v, lo, hi) for k, v in batch.items()}
    return (
        type(batch)(_rows(v, lo, hi) for v in batch) if isinstance(batch, tuple) else [_rows(v, lo, hi) for v in batch]
    )


def _rows(v: Any, lo: int, hi: int) -> Any:
    return v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim > 0 else v


def take_rows(batch: Batch, index: torch.Tensor) -> Any:
    """The rows at `index` of every tensor (a copy; rows may repeat); other leaves are kept whole."""
    if isinstance(batch, torch.Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, Mapping):
        return {k: _take(v, index) for k, v in batch.items()}
    return type(batch)(_take(v, index) for v in batch) if isinstance(batch, tuple) else [_take(v, index) for v in batch]


def _take(v: Any, index: torch.Tensor) -> Any:
    return v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 else v


def cat_batches(batches: Sequence[Any]) -> Any:
    """One batch of the examples of `batches` (all of one structure), in order; other leaves from the first."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return {k: _cat([b[k] for b in batches]) for k in first}
    joined = [_cat([b[i] for b in batches]) for i in range(len(first))]
    return tuple(joined) if isinstance(first, tuple) else joined


def _cat(values: list[Any]) -> Any:
    v = values[0]
    return torch.cat(values) if isinstance(v, torch.Tensor) and v.ndim > 0 else v


def to_device(batch: Batch, device: torch.device, non_blocking: bool = False) -> Any:
    """The batch with every tensor on `device`. `non_blocking` with pinned host memory overlaps the copy
    with compute on CUDA (the DataLoader pins when training on CUDA)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        moved = [to_device(v, device, non_blocking) for v in batch]
        return type(batch)(moved) if isinstance(batch, tuple) else moved
    return batch


def _describe(batch: object) -> str:
    return type(batch).__name__


def model_loss(out: Any) -> torch.Tensor:
    """The loss a model returned: the output itself, `.loss`, or `["loss"]` (Hugging Face's convention)."""
    if isinstance(out, torch.Tensor):
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            f"a dict batch is trained as model(**batch), whose output must be the loss or carry it as "
            f"`.loss` or ['loss'], got a {type(out).__name__}; or give the task a step(model, batch)."
        )
    return loss


def loss_of(model: nn.Module, batch: Any, step: StepFn | None, loss_fn: LossFn | None) -> torch.Tensor:
    """The mean loss of `batch`, in fp32: `step`, else `loss_fn(model(x), y)` or `model(**batch)`."""
    if step is not None:
        return step(model, batch).float()
    if isinstance(batch, Mapping):
        return model_loss(model(**batch)).float()
    if loss_fn is None:
        raise ValueError("a task without step(model, batch) needs loss_fn(outputs, targets) for (x, y) batches.")
    x, y = batch
    return loss_fn(model(x).float(), y)


def check_step_loss(loss: object, name: str) -> None:
    """Refuse a loss that is not the batch mean (a 0-dim tensor): micro-batch weights assume it."""
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"recipe {name!r}: the loss must be the mean over the batch, a 0-dim tensor, got {shape}; "
            "average the per-example losses (.mean(), or reduction='mean')."
        )


def task_loss(task: Task | DataTask, model: nn.Module, batch: Any) -> torch.Tensor:
    """The mean loss of a training batch for either form of task (the loop's one definition of it)."""
    return loss_function(task)(model, batch)


def loss_function(task: Task | DataTask) -> Callable[[nn.Module, Any], torch.Tensor]:
    """`task_loss` for one task, `(model, batch) -> loss`, its form chosen once: the training step calls
    it every step, where a `Task`'s (x, y) batches need none of `loss_of`'s checks."""
    if isinstance(task, DataTask):
        step, any_loss_fn = task.step, task.loss_fn
        return lambda model, batch: loss_of(model, batch, step, any_loss_fn)
    loss_fn = task.loss_fn

    def tensor_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return loss_fn(model(x).float(), y)

    return tensor_loss


def eval_parts(task: Task | DataTask, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(mean loss, number correct or None, number of targets) of one evaluation batch."""
    step = task.step if isinstance(task, DataTask) else None
    if step is not None or isinstance(batch, Mapping) or not task.classification:
        return task_loss(task, model, batch), None, 0
    assert task.loss_fn is not None  # a classification task without step has (x, y) batches and loss_fn
    x, y = batch
    out = model(x)
    return task.loss_fn(out.float(), y), (out.argmax(dim=-1) == y).sum(), y.numel()

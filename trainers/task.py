"""What a recipe hands the training loop: a model, its data, how to compute the loss.

Two forms. `Task`: the whole dataset as tensors on the training device, the fast path
for small data. `DataTask`: data that streams from the host, as a `torch.utils.data.Dataset`
(plus an optional collate function) or as a factory of batches given `(batch_size, seed)`;
batches may be a tensor, a tuple or a dict of tensors, and the recipe may give its own
`step(model, batch) -> loss` and evaluation metrics. docs/recipes.md is the contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A batch: a tensor, a tuple/list of tensors, or a dict of tensors; one row per example in each.
Batch: TypeAlias = torch.Tensor | Sequence[Any] | Mapping[str, Any]
# `step(model, batch)`: the mean loss over the batch, a 0-dim tensor.
StepFn = Callable[[nn.Module, Any], torch.Tensor]
# `factory(batch_size, seed)`: an iterable of batches of exactly `batch_size` examples, one epoch.
BatchFactory = Callable[[int, int], Iterable[Any]]
# `metrics(model, val_batches)`: extra evaluation metrics, {"bleu": ...} logged as val/bleu.
MetricsFn = Callable[[nn.Module, Iterable[Any]], Mapping[str, float]]


@dataclass
class Task:
    """A model and its data. Small datasets live on the training device whole.

    `loss_fn(outputs, targets)` returns the mean loss over the batch.
    `classification` turns on accuracy metrics (`val/acc`, `final/train_acc`): the
    argmax over the last dimension of the outputs compared with the targets, so
    per-token accuracy for sequence models whose outputs are (batch, time, classes).
    """

    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    loss_fn: LossFn
    classification: bool = True
    # Extra eval metrics derived from the mean loss and accuracy, e.g. {"ppl": exp(loss)} for language models.
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    # Examples are sequences of this many tokens (language models): logged as tokens per batch.
    tokens_per_example: int | None = None

    def __post_init__(self) -> None:
        if len(self.train_x) != len(self.train_y):
            raise ValueError(f"train_x has {len(self.train_x)} rows but train_y has {len(self.train_y)}.")
        if len(self.val_x) != len(self.val_y):
            raise ValueError(f"val_x has {len(self.val_x)} rows but val_y has {len(self.val_y)}.")
        if len(self.train_x) == 0 or len(self.val_x) == 0:
            raise ValueError("a task needs at least one training and one validation example.")

    @property
    def num_train(self) -> int:
        return len(self.train_x)


@dataclass
class DataTask:
    """A model and data that streams through a DataLoader (see docs/recipes.md, "Data that streams").

    `train` is a map-style `Dataset` (the loop samples it through a seeded, checkpointable
    batch sampler, collating with `collate_fn`) or a `BatchFactory` (an epoch of batches of
    the requested size for a seed; the loop calls it again, with a new seed, at each epoch).
    `val` is a `Dataset` or a function returning an iterable of validation batches; it must
    not depend on the trial's seed. The loss is `step(model, batch)` if given; otherwise a
    tuple batch `(x, y)` gives `loss_fn(model(x), y)`, and a dict batch `model(**batch)`,
    whose output is the loss or carries it (`.loss` or `["loss"]`, as Hugging Face models do).
    """

    model: nn.Module
    train: Dataset[Any] | BatchFactory
    val: Dataset[Any] | Callable[[], Iterable[Any]]
    loss_fn: LossFn | None = None
    step: StepFn | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    # Accuracy from (x, y) batches without a `step`, as for `Task`.
    classification: bool = False
    metrics: MetricsFn | None = None
    derived_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    # How much a batch counts, in `count_unit` (e.g. tokens: `lambda b: b["attention_mask"].sum()`).
    count: Callable[[Any], int | torch.Tensor] | None = None
    count_unit: str = "tokens"
    # DataLoader worker processes (None: trainers.data.default_workers for the device).
    num_workers: int | None = None
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, got {self.eval_batch_size=}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {self.num_workers=}.")
        if not self.count_unit.isidentifier():
            raise ValueError(f"count_unit must be a plain name such as 'tokens', got {self.count_unit=}.")

    @property
    def streams(self) -> bool:
        """True when the training data is a factory of batches (no known size, no indexing)."""
        return _is_factory(self.train)

    @property
    def num_train(self) -> int | None:
        """The training set's size, or None for a stream."""
        return None if self.streams else len(self.train)  # type: ignore[arg-type]


def _is_factory(data: object) -> bool:
    return callable(data) and not isinstance(data, Dataset)


def classification_task(
    model: nn.Module,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    device: torch.device,
) -> Task:
    """A classifier and its (x, y, x_val, y_val) numpy arrays, moved to the device whole."""
    x, y, x_val, y_val = (
        torch.as_tensor(a, dtype=dtype).to(device)
        for a, dtype in zip(arrays, (torch.float32, torch.long, torch.float32, torch.long), strict=True)
    )
    return Task(
        model=model.to(device),
        train_x=x,
        train_y=y,
        val_x=x_val,
        val_y=y_val,
        loss_fn=nn.functional.cross_entropy,
        classification=True,
    )

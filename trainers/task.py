"""What a recipe hands the training loop: a model, data on the device, a loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

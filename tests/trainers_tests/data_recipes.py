"""Recipes whose data streams (trainers.task.DataTask), one per form, for the tests.

Gaussian blobs in `dim` dimensions, `classes` classes, a small MLP. `form` picks how the
data reaches the loop: `dataset` (a map-style Dataset of (x, y) pairs, default collate),
`collate` (a Dataset of dicts, the recipe's own collate into a dict batch and its own step),
`stream` (a factory of dict batches given (batch_size, seed); the model takes **batch and
returns its loss, Hugging Face style; accuracy from the recipe's own metrics).
`bad` breaks one rule on purpose: `per_example` (a step returning one loss per example),
`ragged` (batches whose tensors disagree on the number of examples). `num_workers` goes
to the `dataset` form's DataLoader. `memory` gives the same blobs as an in-memory `Task`,
the reference the other forms' measurements are compared with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from batchscope.trainers.task import DataTask, Task

DEFAULTS: dict[str, Any] = {
    "form": "dataset",
    "n": 512,
    "dim": 8,
    "classes": 4,
    "hidden": 32,
    "bad": None,
    "num_workers": None,
}


class Blobs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Example i: a point near its class's centre (x) and the class (y); made on the host, read one at a time."""

    def __init__(self, n: int, dim: int, classes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
        self.y = torch.randint(classes, (n,), generator=gen)
        self.x = centres[self.y] + torch.randn(n, dim, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class DictBlobs(Blobs):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"features": self.x[i], "label": self.y[i]}


def collate_dicts(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"features": torch.stack([d["features"] for d in items]), "label": torch.stack([d["label"] for d in items])}


class Classifier(nn.Module):
    """An MLP; given labels (a dict batch through **batch) it returns the mean loss, as Hugging Face models do."""

    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, features: torch.Tensor, label: torch.Tensor | None = None) -> Any:
        logits = self.net(features)
        if label is None:
            return logits
        return {"loss": F.cross_entropy(logits.float(), label), "logits": logits}


def dict_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["features"]).float(), batch["label"])


def per_example_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["features"]).float(), batch["label"], reduction="none")


def accuracy(model: nn.Module, batches: Any) -> dict[str, float]:
    right = total = 0
    for b in batches:
        right += int((model(b["features"]).argmax(-1) == b["label"]).sum())
        total += len(b["label"])
    return {"acc": right / total}


def stream(data: Blobs, ragged: bool = False) -> Any:
    """A factory of epochs: (batch_size, seed) -> dict batches of exactly batch_size, shuffled by seed."""

    def factory(batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        for lo in range(0, len(order) - batch_size + 1, batch_size):  # full batches only
            idx = order[lo : lo + batch_size]
            labels = data.y[idx][:-1] if ragged else data.y[idx]
            yield {"features": data.x[idx], "label": labels}

    return factory


def build(model: str, options: dict[str, Any], device: torch.device) -> DataTask | Task:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"data_recipes: unknown option {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    if model != "mlp":
        raise ValueError(f"data_recipes: no model {model!r}; the only one is 'mlp'")
    o = {**DEFAULTS, **options}
    n, dim, classes, form, bad = int(o["n"]), int(o["dim"]), int(o["classes"]), o["form"], o["bad"]
    net = Classifier(dim, int(o["hidden"]), classes).to(device)
    if form == "dataset":
        return DataTask(
            model=net,
            train=Blobs(n, dim, classes, seed=1),
            val=Blobs(n // 4, dim, classes, seed=2),
            loss_fn=F.cross_entropy,
            classification=True,
            num_workers=o["num_workers"],
        )
    if form == "collate":
        return DataTask(
            model=net,
            train=DictBlobs(n, dim, classes, seed=1),
            val=DictBlobs(n // 4, dim, classes, seed=2),
            collate_fn=collate_dicts,
            step=per_example_step if bad == "per_example" else dict_step,
            metrics=accuracy,
        )
    if form == "stream":
        train, val = Blobs(n, dim, classes, seed=1), Blobs(n // 4, dim, classes, seed=2)
        return DataTask(
            model=net,
            train=stream(train, ragged=bad == "ragged"),
            val=lambda: stream(val)(64, 0),
            metrics=accuracy,
            # Counted as if each example were 3 tokens: the loop logs perf/tokens_per_s from it.
            count=lambda b: 3 * b["features"].shape[0],
        )
    if form == "memory":
        train, val = Blobs(n, dim, classes, seed=1), Blobs(n // 4, dim, classes, seed=2)
        return Task(
            model=net,
            train_x=train.x.to(device),
            train_y=train.y.to(device),
            val_x=val.x.to(device),
            val_y=val.y.to(device),
            loss_fn=F.cross_entropy,
        )
    raise ValueError(f"data_recipes: form must be dataset, collate, stream or memory, got {form!r}")

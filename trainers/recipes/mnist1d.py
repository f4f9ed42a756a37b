"""MNIST-1D (Greydanus 2020): generated offline, small enough to live on the device.

The data are made with `mnist1d.data.make_dataset` (never downloaded) and cached
as .npz, since generating 10,000 examples takes several seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal

import numpy as np
import torch
from torch import nn

from batchscope.cache import cache_dir
from batchscope.trainers.recipes.options import MNIST1D_MODELS as MODELS
from batchscope.trainers.recipes.options import Mnist1dOptions
from batchscope.trainers.recipes.options import mnist1d_num_train as num_train  # noqa: F401  (the registry's)
from batchscope.trainers.task import Task, classification_task


def make_arrays(opts: Mnist1dOptions) -> dict[str, np.ndarray]:
    """x, y, x_test, y_test as numpy arrays, generated once and cached.

    The cache key is our options and the mnist1d version, so a cache hit does not import
    mnist1d (and scipy): a second of start-up.
    """
    from importlib.metadata import version

    key = {
        "num_samples": opts.num_samples,
        "train_split": opts.train_split,
        "seed": opts.data_seed,
        "mnist1d": version("mnist1d"),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{digest}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = opts.num_samples
    args.train_split = opts.train_split
    args.seed = opts.data_seed
    data = make_dataset(args)
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"])
    os.replace(tmp, path)
    return arrays


class MLP(nn.Module):
    def __init__(self, in_features: int = 40, hidden: int = 100, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """The small 1-D CNN of the MNIST-1D paper: three convolutions, one linear head."""

    def __init__(self, length: int = 40, channels: int = 25, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=1, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 1, length)).numel()
        self.head = nn.Linear(flat, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.unsqueeze(1))
        return self.head(h.flatten(1))


def build(model: Literal["mlp", "cnn"] | str, options: Mnist1dOptions, device: torch.device) -> Task:
    arrays = make_arrays(options)
    length = arrays["x"].shape[1]
    net: nn.Module
    if model == "mlp":
        net = MLP(length, options.hidden)
    elif model == "cnn":
        net = CNN1d(length, options.channels)
    else:
        raise ValueError(f"mnist1d has no model {model!r}; choose one of {MODELS}.")

    return classification_task(net, (arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]), device)

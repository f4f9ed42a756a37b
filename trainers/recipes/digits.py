"""scikit-learn's 8×8 handwritten digits: shipped with scikit-learn, never downloaded.

1,797 images, 10 classes, small enough to live on the device whole. A small CNN
whose normalization layer is chosen by the `norm` option, so that a sweep shows
what BatchNorm does at small (micro-)batches: its statistics come from the
examples of one forward pass, GroupNorm's from each example alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from batchscope.trainers.recipes.options import DIGITS_MODELS as MODELS
from batchscope.trainers.recipes.options import DIGITS_NUM_EXAMPLES as NUM_EXAMPLES  # noqa: F401  (re-exported)
from batchscope.trainers.recipes.options import DigitsOptions, Norm
from batchscope.trainers.recipes.options import digits_num_train as num_train  # noqa: F401  (the registry's)
from batchscope.trainers.task import Task, classification_task


def load_arrays(options: DigitsOptions) -> dict[str, np.ndarray]:
    """Standardized images (N, 1, 8, 8) and labels, split with the fixed data seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = np.asarray(data.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(data.target, dtype=np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=options.val_fraction, stratify=y, random_state=options.data_seed
    )
    # One mean and scale for all pixels, from the training part only: corner pixels are
    # almost always blank, and a per-pixel scale would blow their rare ink up.
    mean, std = float(x_train.mean()), float(x_train.std())
    return {
        "x": (x_train - mean) / std,
        "y": y_train,
        "x_val": (x_val - mean) / std,
        "y_val": y_val,
    }


def make_norm(norm: Norm, channels: int, groups: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class DigitsCNN(nn.Module):
    """Three 3×3 convolutions (each followed by the chosen norm and ReLU), one pooling, a linear head."""

    def __init__(self, channels: int = 16, norm: Norm = "batch", groups: int = 4, classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels, 2 * channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            # The norm's shift makes a convolution bias redundant.
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none")
            return [conv, make_norm(norm, c_out, groups), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, c1),
            *block(c1, c2),
            nn.MaxPool2d(2),  # 8×8 -> 4×4
            *block(c2, c2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(model: str, options: DigitsOptions, device: torch.device) -> Task:
    if model != "cnn":
        raise ValueError(f"digits has no model {model!r}; choose one of {MODELS}.")
    arrays = load_arrays(options)
    net = DigitsCNN(options.channels, options.norm, options.groups)

    return classification_task(net, (arrays["x"], arrays["y"], arrays["x_val"], arrays["y_val"]), device)

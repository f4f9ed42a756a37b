"""CIFAR-10 from the user's local copy, trained by a ResNet-9 in the speed-run style.

The data are the standard python pickle batches (`data_batch_1` … `data_batch_5`,
`test_batch` in the extracted `cifar-10-batches-py` folder), read once and put on
the device whole as uint8. Normalization and augmentation (random crop with
padding, horizontal flip) run inside the model's forward on the whole batch on
the device, so the training loop is the same as for any other recipe: no
per-example Python, no host sync. The network is David Page's ResNet-9, the
ancestor of KellerJordan/cifar10-airbench, with its widths scaled by `width`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from batchscope.trainers.recipes.files import CIFAR10_TEST_FILE as TEST_FILE  # noqa: F401  (tests and users)
from batchscope.trainers.recipes.files import CIFAR10_TRAIN_FILES as TRAIN_FILES  # noqa: F401
from batchscope.trainers.recipes.files import cifar10_num_train as num_train  # noqa: F401  (the registry's)
from batchscope.trainers.recipes.files import load_cifar10
from batchscope.trainers.recipes.options import CIFAR10_MODELS as MODELS
from batchscope.trainers.recipes.options import Cifar10Options
from batchscope.trainers.task import Task

# Per-channel mean and standard deviation of the CIFAR-10 training images, in [0, 1] units.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


# ---- augmentation on whole batches on the device ---------------------------------


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image of the batch cropped at its own random offset from the image padded with zeros."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded.gather(2, rows.expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols.expand(n, c, h, w))


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Each image of the batch mirrored left-right with probability 1/2."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# ---- the network ---------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 (Page 2018): prep, three pooled stages, two of them residual, max-pool, linear.

    Takes uint8 images (N, 3, 32, 32); in training mode it augments them first.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(
        self,
        width: int = 64,
        classes: int = 10,
        *,
        augment: bool = True,
        crop_padding: int = 4,
        flip: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.channels_last = channels_last
        # Scaled to uint8 units so normalization is one multiply-add.
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255))
        w = width
        self.net = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w, pool=True),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, classes, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) * self.inv_std
        if self.training and self.augment:
            x = random_crop(x, self.crop_padding)
            if self.flip:
                x = random_flip(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # The small output scale from the original keeps the initial logits, and loss, tame.
        return self.net(x) * 0.125


def build(model: str, options: Cifar10Options, device: torch.device) -> Task:
    if model != "resnet9":
        raise ValueError(f"cifar10 has no model {model!r}; choose one of {MODELS}.")
    arrays = load_cifar10(options.data_dir, options.train_batches, options.limit)
    # channels_last lets cuDNN pick its fastest convolutions; on CPU the default layout is as good.
    channels_last = device.type == "cuda"
    net = ResNet9(
        options.width,
        augment=options.augment,
        crop_padding=options.crop_padding,
        flip=options.flip,
        channels_last=channels_last,
    ).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # supported, not in the stubs

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return Task(
        model=net,
        train_x=tensor(arrays["x"]),  # uint8: a quarter of float32's memory; the model converts per batch
        train_y=tensor(arrays["y"]),
        val_x=tensor(arrays["x_val"]),
        val_y=tensor(arrays["y_val"]),
        loss_fn=nn.functional.cross_entropy,
        classification=True,
    )

"""A worked example of data that streams: an image classifier reading a folder of image files.

Written as a user's recipe would be (docs/recipes.md, "Data that streams"), and named
by import path: `recipe: "batchscope.trainers.recipes.image_folder:build"`. The folder
holds one subfolder per class under `train/` and `val/` (the layout of torchvision's
ImageFolder), images in any format PIL reads:

    data_dir/train/cat/0001.png   data_dir/val/cat/0107.png
    data_dir/train/dog/0002.png   ...

Images are decoded one at a time in the DataLoader's workers, resized to `image_size`
and handed over as uint8 (4× less to copy to the GPU than floats); the model scales them.
Only the file list is in memory, so the folder may be any size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from batchscope.trainers.task import DataTask

MODELS = ("cnn",)
DEFAULTS: dict[str, Any] = {"data_dir": None, "image_size": 32, "width": 16, "num_workers": None}
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """(image as a uint8 tensor (3, size, size), class index) for every image file under `root/<class>/`."""

    def __init__(self, root: Path, classes: list[str], image_size: int) -> None:
        self.files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in SUFFIXES
        ]
        if not self.files:
            raise ValueError(f"image_folder: no image files ({', '.join(SUFFIXES)}) under {root}/<class>/.")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # Pillow, a dependency of matplotlib

        path, label = self.files[i]
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((self.image_size, self.image_size))
            pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))
        return pixels.permute(2, 0, 1).contiguous(), label


class SmallCNN(nn.Module):
    """Two convolutions, global average pooling, a linear classifier; uint8 images in, logits out."""

    def __init__(self, classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 - 0.5  # scaled on the device: the loader moves uint8
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x)


def build(model: str, options: dict[str, Any], device: torch.device) -> DataTask:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"image_folder: unknown option {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    if model not in MODELS:
        raise ValueError(f"image_folder: no model {model!r}; choose one of {MODELS}")
    opts = {**DEFAULTS, **options}
    if not opts["data_dir"]:
        raise ValueError("image_folder: set trainer.data_dir to a folder holding train/<class>/ and val/<class>/")
    root = Path(str(opts["data_dir"])).expanduser()
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ValueError(f"image_folder: data_dir {root} must hold train/<class>/ and val/<class>/ folders")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    missing = [c for c in classes if not (root / "val" / c).is_dir()]
    if len(classes) < 2 or missing:
        what = f"val/ lacks {missing[0]!r}" if missing else f"found {len(classes)} class folder(s)"
        raise ValueError(f"image_folder: data_dir {root} needs at least two classes in train/ and val/ ({what})")
    size = int(opts["image_size"])
    return DataTask(
        model=SmallCNN(len(classes), int(opts["width"])).to(device),
        train=ImageFolder(root / "train", classes, size),
        val=ImageFolder(root / "val", classes, size),
        loss_fn=F.cross_entropy,
        classification=True,  # val/acc, final/train_acc, ... from the logits' argmax
        num_workers=None if opts["num_workers"] is None else int(opts["num_workers"]),
    )

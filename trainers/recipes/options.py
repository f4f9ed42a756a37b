"""What a config is checked against for each built-in recipe: its models, options and metrics.

Kept apart from the recipes themselves, which import torch: the sweep process
validates a config with these alone and never imports torch (a second or two of
start-up); the recipe's module is imported where its task is built. Each recipe
module re-exports its own names from here.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ---- mnist1d -------------------------------------------------------------------

MNIST1D_MODELS = ("mlp", "cnn")


class Mnist1dOptions(BaseModel):
    """Recipe options, given in a config's `trainer:` section."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_samples: int = Field(default=5000, ge=100, le=1_000_000)
    train_split: float = Field(default=0.8, gt=0.0, lt=1.0)
    # The data seed is fixed across trials so that every trial sees the same data.
    data_seed: int = 42
    hidden: int = Field(default=100, ge=1)
    channels: int = Field(default=25, ge=1)


def mnist1d_num_train(options: Mnist1dOptions) -> int:
    """Training examples, without generating the data (mnist1d splits by int(n * split))."""
    return int(options.num_samples * options.train_split)


# ---- digits --------------------------------------------------------------------

DIGITS_MODELS = ("cnn",)
DIGITS_NUM_EXAMPLES = 1797

Norm = Literal["batch", "group", "none"]


class DigitsOptions(BaseModel):
    """Recipe options, given in a config's `trainer:` section."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # BatchNorm2d, GroupNorm or nothing after each convolution.
    norm: Norm = "batch"
    # Channels of the first convolution; the later ones have twice as many.
    channels: int = Field(default=16, ge=1, le=1024)
    # GroupNorm's number of groups; must divide `channels`.
    groups: int = Field(default=4, ge=1)
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # The split is fixed across trials so that every trial sees the same data.
    data_seed: int = 42

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> DigitsOptions:
        if self.norm == "group" and self.channels % self.groups != 0:
            raise ValueError(
                f"groups must divide channels for norm='group', got groups={self.groups} and channels={self.channels}"
            )
        return self


def digits_num_train(options: DigitsOptions) -> int:
    """Training-set size, as the stratified split makes it (scikit-learn rounds the test part up)."""
    return DIGITS_NUM_EXAMPLES - math.ceil(options.val_fraction * DIGITS_NUM_EXAMPLES)


# ---- cifar10 -------------------------------------------------------------------

CIFAR10_MODELS = ("resnet9",)


class Cifar10Options(BaseModel):
    """Recipe options, given in a config's `trainer:` section."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # The extracted `cifar-10-batches-py` folder (the "CIFAR-10 python version" archive).
    data_dir: str
    # Use data_batch_1 … data_batch_N only.
    train_batches: int = Field(default=5, ge=1, le=5)
    # At most this many training and this many validation examples (quick runs).
    limit: int | None = Field(default=None, ge=1)
    # Channels of the first convolution; the stages have 2×, 4× and 8× as many (64 is the original).
    width: int = Field(default=64, ge=1, le=1024)
    augment: bool = True
    # Random crops of the image padded by this many pixels on each side.
    crop_padding: int = Field(default=4, ge=0, le=16)
    flip: bool = True


# ---- charlm --------------------------------------------------------------------

CHARLM_MODELS = ("transformer",)
CHARLM_METRICS = ("val/loss", "val/acc", "val/ppl", "train/loss")


class CharLMOptions(BaseModel):
    """Recipe options, given in a config's `trainer:` section."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # A local UTF-8 text file (for example Tiny Shakespeare's input.txt).
    text_file: str
    seq_len: int = Field(default=128, ge=1, le=8192)
    d_model: int = Field(default=128, ge=1, le=8192)
    n_layers: int = Field(default=4, ge=1, le=64)
    n_heads: int = Field(default=4, ge=1)
    # The last part of the text held out for validation.
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> CharLMOptions:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"n_heads must divide d_model, got n_heads={self.n_heads} and d_model={self.d_model}")
        return self

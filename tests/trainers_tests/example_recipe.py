"""An example user recipe: teacher–student regression, named in a config by import path.

    trainer: {recipe: "tests.trainers_tests.example_recipe:build", model: mlp, dim: 16}

`build` is the bare form: options arrive as a plain dict and any model name is
passed on. `RECIPE` is the declared form: its models and options are checked
when the config is loaded, before any trial runs. docs/recipes.md walks through it.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from batchscope.trainers.recipes import Recipe
from batchscope.trainers.task import Task

MODELS = ("mlp", "linear")
DEFAULTS: dict[str, Any] = {"n_examples": 2000, "dim": 16, "hidden": 64, "noise": 0.1, "data_seed": 0}


def build(model: str, options: dict[str, Any], device: torch.device) -> Task:
    """A random linear teacher labels Gaussian inputs; the student is an MLP or a linear map."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"example_recipe: unknown option {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    n, dim = int(opts["n_examples"]), int(opts["dim"])

    # The data depend on data_seed only, so every trial of a sweep sees the same examples.
    gen = torch.Generator().manual_seed(int(opts["data_seed"]))
    x = torch.randn(n, dim, generator=gen)
    teacher = torch.randn(dim, 1, generator=gen) / dim**0.5
    y = x @ teacher + float(opts["noise"]) * torch.randn(n, 1, generator=gen)

    net: nn.Module
    if model == "mlp":
        hidden = int(opts["hidden"])
        net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    elif model == "linear":
        net = nn.Linear(dim, 1)
    else:
        raise ValueError(f"example_recipe: no model {model!r}; choose one of {MODELS}")

    n_train = int(0.8 * n)
    x, y = x.to(device), y.to(device)  # the whole dataset on the training device, once
    return Task(
        model=net.to(device),
        train_x=x[:n_train],
        train_y=y[:n_train],
        val_x=x[n_train:],
        val_y=y[n_train:],
        loss_fn=nn.functional.mse_loss,  # the mean over the batch
        classification=False,  # regression: no accuracy metrics
    )


class TeacherOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    n_examples: int = Field(default=2000, ge=10)
    dim: int = Field(default=16, ge=1)
    hidden: int = Field(default=64, ge=1)
    noise: float = Field(default=0.1, ge=0.0)
    data_seed: int = 0


def _build_checked(model: str, options: TeacherOptions, device: torch.device) -> Task:
    return build(model, options.model_dump(), device)


RECIPE = Recipe(
    name="tests.trainers_tests.example_recipe:RECIPE",
    models=MODELS,
    options=TeacherOptions,
    build=_build_checked,
    metrics=("val/loss", "train/loss"),  # a regression: no val/acc to aim at
)

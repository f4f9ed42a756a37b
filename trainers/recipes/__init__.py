"""The registry of built-in training recipes: name -> models, options, builder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from trainers.recipes import mnist1d
from trainers.task import Task


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[str, ...]
    options: type[BaseModel]
    build: Callable[[str, Any, torch.device], Task]
    # Metrics a target may name, besides the loss ones every recipe has.
    metrics: tuple[str, ...] = ("val/loss", "val/acc", "train/loss")


RECIPES: dict[str, Recipe] = {
    "mnist1d": Recipe("mnist1d", mnist1d.MODELS, mnist1d.Mnist1dOptions, mnist1d.build),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}") from None


def build_task(name: str, model: str, options: Mapping[str, Any], device: torch.device) -> Task:
    recipe = get_recipe(name)
    if model not in recipe.models:
        raise ValueError(f"recipe {name!r} has no model {model!r}; choose one of {', '.join(recipe.models)}.")
    return recipe.build(model, recipe.options.model_validate(dict(options)), device)


__all__ = ["RECIPES", "Recipe", "build_task", "get_recipe"]

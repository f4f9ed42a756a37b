"""The registry of training recipes: name -> models, options, builder.

Built-in recipes are looked up by name (`mnist1d`, `digits`, `cifar10`, `charlm`).
Their models, options and metrics come from `batchscope.trainers.recipes.options`, which does not
import torch, so a config is checked without it (the sweep process never imports torch);
a recipe's own module is imported when its task is built.
A user's own recipe is named by import path, `package.module:attribute`, where the
attribute is either a `Recipe` or a function `build(model, options, device) -> Task`
(see docs/recipes.md).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from batchscope.trainers.recipes import files
from batchscope.trainers.recipes import options as builtin

if TYPE_CHECKING:
    import torch

    from batchscope.trainers.task import DataTask, Task

DEFAULT_METRICS = ("val/loss", "val/acc", "train/loss")


@dataclass(frozen=True)
class Recipe:
    name: str
    models: tuple[str, ...]
    options: type[BaseModel]
    build: Callable[[str, Any, torch.device], Task | DataTask]
    # Metrics a target may name, besides the loss ones every recipe has.
    metrics: tuple[str, ...] = DEFAULT_METRICS
    # The training-set size from validated options, without building the model (for epoch
    # budgets); None where unknown.
    num_train: Callable[[Any], int] | None = None


class AnyModel(tuple[str, ...]):
    """The models of a recipe given as a bare build function: any name, the function checks it."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str)


class UserOptions(BaseModel):
    """Options of a recipe given as a bare build function: any keys, passed on as a plain dict."""

    model_config = ConfigDict(extra="allow")


def _deferred(name: str, attr: str) -> Callable[..., Any]:
    """`batchscope.trainers.recipes.<name>.<attr>`, its module imported at the first call (it imports torch)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"batchscope.trainers.recipes.{name}"), attr)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{name}.{attr}"
    return call


RECIPES: dict[str, Recipe] = {
    "mnist1d": Recipe(
        "mnist1d",
        builtin.MNIST1D_MODELS,
        builtin.Mnist1dOptions,
        _deferred("mnist1d", "build"),
        num_train=builtin.mnist1d_num_train,
    ),
    "digits": Recipe(
        "digits",
        builtin.DIGITS_MODELS,
        builtin.DigitsOptions,
        _deferred("digits", "build"),
        num_train=builtin.digits_num_train,
    ),
    "cifar10": Recipe(
        "cifar10",
        builtin.CIFAR10_MODELS,
        builtin.Cifar10Options,
        _deferred("cifar10", "build"),
        num_train=files.cifar10_num_train,  # reads the data files (without torch)
    ),
    "charlm": Recipe(
        "charlm",
        builtin.CHARLM_MODELS,
        builtin.CharLMOptions,
        _deferred("charlm", "build"),
        metrics=builtin.CHARLM_METRICS,
        num_train=files.charlm_num_train,  # reads the text (without torch)
    ),
}


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or a user's recipe by import path `package.module:attribute`."""
    if ":" in name:
        return _import_recipe(name)
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}, "
            "or name your own as 'package.module:build'"
        ) from None


def _import_recipe(path: str) -> Recipe:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"recipe {path!r}: write a user recipe as 'package.module:build' (one ':').")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure (missing module, syntax error, its own imports) is the user's to fix
        raise ValueError(
            f"recipe {path!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "install it or run from the folder that holds it with PYTHONPATH=."
        ) from None
    if not hasattr(module, attr):
        raise ValueError(f"recipe {path!r}: module {module_name!r} has no attribute {attr!r}.")
    obj = getattr(module, attr)
    if isinstance(obj, Recipe):
        return obj
    if not callable(obj):
        raise ValueError(
            f"recipe {path!r}: {attr!r} is not callable (its type is {type(obj).__name__}); "
            "point at a function build(model, options, device) -> Task or at a Recipe."
        )
    try:
        inspect.signature(obj).bind("model", {}, "cpu")  # binding checks the arity only: no torch needed
    except TypeError:
        raise ValueError(
            f"recipe {path!r}: {attr!r} must accept (model, options, device), but its signature is "
            f"{attr}{inspect.signature(obj)}."
        ) from None
    except ValueError:
        pass  # no signature to inspect (some builtins): find out when it is called

    def build(model: str, options: UserOptions, device: torch.device) -> Task | DataTask:
        return obj(model, dict(options.model_extra or {}), device)

    return Recipe(path, AnyModel(), UserOptions, build)


def build_any_task(name: str, model: str, options: Mapping[str, Any], device: torch.device) -> Task | DataTask:
    """Validate the options, build the recipe's task on `device` (either form), and check what came back."""
    from batchscope.trainers.task import DataTask

    recipe = get_recipe(name)
    if model not in recipe.models:
        raise ValueError(f"recipe {name!r} has no model {model!r}; choose one of {', '.join(recipe.models)}.")
    task = recipe.build(model, recipe.options.model_validate(dict(options)), device)
    if isinstance(task, DataTask):
        check_data_task(task, device, name)
    else:
        check_task(task, device, name)
    return task


def stated_num_train(name: str, options: Mapping[str, Any]) -> int | None:
    """The training-set size the recipe states from its options (`Recipe.num_train`), or None:
    for a stream, whose size the data itself does not tell."""
    recipe = get_recipe(name)
    if recipe.num_train is None:
        return None
    return int(recipe.num_train(recipe.options.model_validate(dict(options))))


def build_task(name: str, model: str, options: Mapping[str, Any], device: torch.device) -> Task:
    """As `build_any_task`, for code that indexes the data as tensors on the device (the
    hand-written reference loop in benchmarks/, tests): a `DataTask` is refused. Every command
    and measurement takes either form (`build_any_task`)."""
    from batchscope.trainers.task import DataTask

    task = build_any_task(name, model, options, device)
    if isinstance(task, DataTask):
        raise ValueError(
            f"recipe {name!r} gives its data as a DataTask (a Dataset or a stream); this code needs it "
            "in memory as a Task (train_x, train_y, ...): build it with build_any_task instead."
        )
    return task


def check_data_task(task: DataTask, device: torch.device, name: str) -> None:
    """Refuse a DataTask the loop cannot train, saying which field is wrong.

    Runs the loss once on the first two validation examples in eval mode, before any timing:
    the loss must be the batch mean (a 0-dim tensor), the batch's tensors one row per example.
    """
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from batchscope.trainers.batches import batch_size_of, check_step_loss, slice_batch, task_loss
    from batchscope.trainers.data import val_batches

    if not isinstance(task.model, nn.Module):
        raise ValueError(f"recipe {name!r}: Task.model must be a torch.nn.Module, got {type(task.model).__name__}.")
    for key in ("train", "val"):
        value = getattr(task, key)
        if not (isinstance(value, Dataset) or callable(value)):
            raise ValueError(
                f"recipe {name!r}: DataTask.{key} must be a torch Dataset or a function giving batches, "
                f"got {type(value).__name__}."
            )
    param = next(iter(task.model.parameters()), None)
    if param is not None and not _on(param.device, device):
        raise ValueError(f"recipe {name!r}: the model is on {param.device}, not on the training device {device}.")
    first = next(iter(val_batches(task, device)), None)
    if first is None:
        raise ValueError(f"recipe {name!r}: the validation data gave no batch; it needs at least one example.")
    try:
        two = slice_batch(first, 0, min(2, batch_size_of(first)))
    except ValueError as exc:
        raise ValueError(f"recipe {name!r}: validation {exc}") from None
    was_training = task.model.training
    task.model.eval()
    try:
        with torch.no_grad():
            loss = task_loss(task, task.model, two)
    except ValueError as exc:  # no loss_fn for (x, y) batches, a dict batch's model without a loss, ...
        raise ValueError(f"recipe {name!r}: {exc}") from None
    finally:
        task.model.train(was_training)
    check_step_loss(loss, name)


def check_task(task: object, device: torch.device, name: str) -> None:
    """Refuse a task the loop cannot train, saying which field is wrong.

    Runs the model once on two training examples in eval mode, before any timing.
    """
    import torch
    from torch import nn

    from batchscope.trainers.task import Task

    if not isinstance(task, Task):
        raise ValueError(f"recipe {name!r} returned a {type(task).__name__}, not a trainers.task.Task.")
    if not isinstance(task.model, nn.Module):
        raise ValueError(f"recipe {name!r}: Task.model must be a torch.nn.Module, got {type(task.model).__name__}.")
    tensors = {k: getattr(task, k) for k in ("train_x", "train_y", "val_x", "val_y")}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"recipe {name!r}: Task.{key} must be a torch.Tensor, got {type(value).__name__}.")
        if not _on(value.device, device):
            raise ValueError(f"recipe {name!r}: Task.{key} is on {value.device}, not on the training device {device}.")
    param = next(iter(task.model.parameters()), None)
    if param is not None and not _on(param.device, device):
        raise ValueError(f"recipe {name!r}: the model is on {param.device}, not on the training device {device}.")
    for x, y in (("train_x", "val_x"), ("train_y", "val_y")):
        if tensors[x].shape[1:] != tensors[y].shape[1:]:
            raise ValueError(
                f"recipe {name!r}: Task.{x} has examples of shape {tuple(tensors[x].shape[1:])} "
                f"but Task.{y} has {tuple(tensors[y].shape[1:])}."
            )
    model = task.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(task.train_x[:2])
            loss = task.loss_fn(out.float(), task.train_y[:2])
    finally:
        model.train(was_training)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"recipe {name!r}: Task.loss_fn must return the mean loss as a 0-dim tensor, got {shape}; "
            "average over the batch (reduction='mean')."
        )
    if task.classification and out.shape[:-1] != task.train_y[:2].shape:
        raise ValueError(
            f"recipe {name!r}: classification=True takes the argmax over the outputs' last dimension, so the "
            f"outputs {tuple(out.shape)} must be the targets' shape {tuple(task.train_y[:2].shape)} plus classes; "
            "set classification=False for other outputs."
        )


def _on(actual: torch.device, wanted: torch.device) -> bool:
    # torch.device("cuda") means the current CUDA device, whose tensors say cuda:0.
    if actual.type != wanted.type:
        return False
    return wanted.index is None or actual.index is None or actual.index == wanted.index


__all__ = [
    "RECIPES",
    "AnyModel",
    "Recipe",
    "UserOptions",
    "build_any_task",
    "build_task",
    "check_data_task",
    "check_task",
    "get_recipe",
    "stated_num_train",
]

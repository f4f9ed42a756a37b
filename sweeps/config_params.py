"""`search.params`: more hyperparameters searched with the batch size and the learning rate.

    search:
      params:
        weight_decay: {low: 1.0e-4, high: 0.1, log: true, scale_with_batch: true}
        beta2: {values: [0.95, 0.99, 0.999]}
        warmup_steps: {values: [0, 100, 500]}
        dropout: {low: 0.0, high: 0.3}          # an option the recipe declares

A name is an optimizer setting (trainers.optim.BUILTIN_SETTINGS, or any option a factory
takes), `warmup_steps`, or an option of the recipe. `scale_with_batch` applies the setting's
batch-size rule (trainers.optim.coupled_settings) from `train.lr_scaling.reference_batch`; the
sampled value is then the setting at the reference batch, and the trainer logs the value it used
as `effective_<name>`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from batchscope.trainers.optim import BUILTIN_SETTINGS, COUPLINGS


def _number(value: Any) -> Any:
    # YAML 1.1 reads `1e-4` (no dot) as a string.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[int | float, BeforeValidator(_number)]
Choice = Annotated[bool | int | float | str, BeforeValidator(_number)]


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    # Apply the setting's batch-size rule from train.lr_scaling.reference_batch (weight_decay, beta1, beta2, eps).
    scale_with_batch: bool = False


class ParamValues(_Param):
    values: Annotated[list[Choice], Field(min_length=1)]

    @model_validator(mode="after")
    def _distinct(self) -> ParamValues:
        if len(set(map(repr, self.values))) != len(self.values):
            raise ValueError(f"values must be distinct, got {self.values}")
        return self

    def choices(self) -> list[Any]:
        return list(self.values)


class ParamRange(_Param):
    """A range; whole-number bounds (`{low: 0, high: 500}`) sample whole numbers."""

    low: Number
    high: Number
    log: bool = False
    # Only for the grid sampler: how many (log-)evenly spaced values to try.
    grid_points: Annotated[int, Field(ge=2, le=1000)] = 5

    @model_validator(mode="after")
    def _order(self) -> ParamRange:
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got low={self.low} and high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got low={self.low}")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def choices(self) -> list[Any]:
        """The grid sampler's values: evenly spaced (in log space with `log`), whole numbers if integer."""
        raw = evenly_spaced(float(self.low), float(self.high), self.grid_points, self.log)
        if self.integer:
            return sorted({round(x) for x in raw})
        return [float(f"{x:.6g}") for x in raw]


def evenly_spaced(low: float, high: float, n: int, log: bool) -> list[float]:
    """`n` values from `low` to `high`, evenly spaced (in log10 space with `log`): a range's grid."""
    if log:
        a, b = math.log10(low), math.log10(high)
        return [10 ** (a + (b - a) * i / (n - 1)) for i in range(n)]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def _values_or_range(raw: Any) -> str:
    if isinstance(raw, dict):
        return "by-values" if "values" in raw else "by-range"
    return "by-range" if hasattr(raw, "low") else "by-values"


ParamSpace = Annotated[
    Annotated[ParamValues, Tag("by-values")] | Annotated[ParamRange, Tag("by-range")], Discriminator(_values_or_range)
]

Route = Literal["optimizer", "train", "recipe"]
# Searched names that are the trainer's own settings, not the optimizer's or the recipe's.
TRAIN_PARAMS = ("warmup_steps",)
# Child-run params a searched name must not shadow (sweeps.specs.run_params), except those that
# are the same setting (weight_decay, momentum, warmup_steps).
RESERVED = (
    "batch_size", "lr", "optimizer", "seed", "trainer", "model", "dataset", "max_steps", "eval_every",
    "lr_scaling", "reference_batch", "schedule", "target", "gns", "gns_every", "gns_max_overhead",
    "divergence_factor", "memory_limit_mb", "micro_batch_size",
)  # fmt: skip


def route(name: str, optimizer: str, recipe_fields: tuple[str, ...] | None) -> Route | None:
    """Where a searched name goes: the optimizer, the trainer or the recipe (None: nowhere).

    `recipe_fields` None: the recipe takes any option (a bare build function).
    """
    in_recipe = recipe_fields is None or name in recipe_fields
    if name in TRAIN_PARAMS:
        return "train"
    if optimizer in BUILTIN_SETTINGS:
        if name in BUILTIN_SETTINGS[optimizer]:
            return "optimizer"
        return "recipe" if in_recipe else None
    # A factory takes the options its signature accepts; a recipe option of the same name would be ambiguous.
    return "recipe" if recipe_fields is not None and name in recipe_fields else "optimizer"


def check_searched(cfg: Any) -> None:
    """`cfg.search.params` (cfg: a SweepConfig) against the optimizer, the trainer and the recipe:
    every name goes somewhere, each value is one its setting takes, couplings only where a rule exists."""
    from batchscope.sweeps.config_optim import check_setting
    from batchscope.trainers.recipes import get_recipe

    optimizer = cfg.train.optimizer.name
    recipe = get_recipe(cfg.trainer.recipe)
    fields = recipe.options.model_fields
    recipe_fields = _recipe_fields(cfg)
    if optimizer not in BUILTIN_SETTINGS:
        _check_factory(optimizer, cfg)  # once: its signature against every option it will get
    for name, space in cfg.search.params.items():
        where = f"search.params.{name}"
        goes = _check_name(name, space, optimizer, recipe_fields, where)
        if name in cfg.train.optimizer.options:
            raise ValueError(f"{where}: also fixed in train.optimizer; give it in one place")
        if name in cfg.train.model_fields_set and name in ("momentum", "weight_decay"):
            raise ValueError(f"{where}: also fixed as train.{name}; give it in one place")
        whole = goes == "train" or (goes == "recipe" and name in fields and fields[name].annotation is int)
        decimal = (goes == "optimizer" and optimizer in BUILTIN_SETTINGS) or (
            goes == "recipe" and name in fields and fields[name].annotation is float
        )
        if isinstance(space, ParamRange) and whole and not space.integer:
            raise ValueError(f"{where}: {name} is a whole number; give low and high as whole numbers")
        if isinstance(space, ParamRange) and decimal and space.integer:
            raise ValueError(f"{where}: {name} is a decimal; give low and high with a decimal point (e.g. 0.0)")
        values = space.choices() if isinstance(space, ParamValues) else [space.low, space.high]
        for value in values:
            if goes == "optimizer" and optimizer in BUILTIN_SETTINGS:
                check_setting(name, value, where)
            elif goes == "train" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"{where}: warmup_steps must be whole numbers ≥ 0, got {value!r}")
            elif goes == "recipe":
                _check_recipe_value(recipe, cfg.trainer.options, name, value, where)


def _check_name(
    name: str, space: ParamValues | ParamRange, optimizer: str, recipe_fields: tuple[str, ...] | None, where: str
) -> Route:
    if name in RESERVED:
        raise ValueError(f"{where}: {name} is searched or set elsewhere (search.batch_size, search.lr, train.*)")
    goes = route(name, optimizer, recipe_fields)
    if goes is None:
        known = [*BUILTIN_SETTINGS.get(optimizer, ()), *TRAIN_PARAMS, *(recipe_fields or ())]
        raise ValueError(f"{where}: not a setting of {optimizer} nor a recipe option; choose one of {known}")
    if space.scale_with_batch and (name not in COUPLINGS or goes != "optimizer"):
        raise ValueError(
            f"{where}.scale_with_batch: no batch-size rule for {name}; rules exist for the optimizer's "
            f"{', '.join(COUPLINGS)}"
        )
    return goes


def _check_factory(path: str, cfg: Any) -> None:
    from batchscope.trainers.optim import check_factory_options, resolve_factory

    searched = [n for n in cfg.search.params if route(n, path, _recipe_fields(cfg)) == "optimizer"]
    check_factory_options(path, resolve_factory(path), [*cfg.train.optimizer.options, *searched])


def _recipe_fields(cfg: Any) -> tuple[str, ...] | None:
    from batchscope.trainers.recipes import get_recipe

    options = get_recipe(cfg.trainer.recipe).options
    return None if options.model_config.get("extra") == "allow" else tuple(options.model_fields)


def _check_recipe_value(recipe: Any, options: dict[str, Any], name: str, value: Any, where: str) -> None:
    from pydantic import ValidationError

    try:
        recipe.options.model_validate({**options, name: value})
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise ValueError(f"{where}: {value!r} is not a value of recipe option {name} ({problem})") from None

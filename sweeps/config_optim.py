"""`train.optimizer`: a built-in name, a built-in with its settings, or a factory's import path.

    optimizer: adamw                                     # as before
    optimizer: {adamw: {betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1}}
    optimizer: {sgd: {momentum: 0.9, nesterov: true}}
    optimizer: mypackage.optim:make                      # make(params, lr) -> torch.optim.Optimizer
    optimizer: {mypackage.optim:make: {weight_decay: 0.05}}   # make(params, lr, weight_decay=0.05)

What each setting means and how the optimizer is built is trainers.optim's; here the forms are
read and the values checked, so that a typo fails before any trial runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from batchscope.trainers.optim import BUILTIN_SETTINGS, check_factory_options, is_import_path, resolve_factory


class OptimizerChoice(BaseModel):
    """The optimizer's name (or import path) and its settings (Adam's betas as beta1 and beta2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "sgd"
    options: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            return {"name": raw, "options": {}}
        if isinstance(raw, Mapping) and set(raw) <= {"name", "options"}:
            return raw  # the model's own fields (its default, a copy)
        if isinstance(raw, Mapping) and len(raw) == 1:
            ((name, options),) = raw.items()
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                raise ValueError(f"the settings of {name!r} must be a mapping, got {options!r}")
            # A factory gets its options as written; a built-in's betas are searched as beta1 and beta2.
            return {"name": name, "options": _split_betas(dict(options)) if name in BUILTIN_SETTINGS else dict(options)}
        raise ValueError(
            f"give a name (sgd, adam, adamw or 'package.module:function') or one name with its settings, got {raw!r}"
        )

    @model_validator(mode="after")
    def _known(self) -> OptimizerChoice:
        if self.name in BUILTIN_SETTINGS:
            check_builtin_settings(self.name, self.options, "train.optimizer")
        elif is_import_path(self.name):
            check_factory_options(self.name, resolve_factory(self.name), list(self.options))
        else:
            raise ValueError(
                f"unknown optimizer {self.name!r}; choose sgd, adam or adamw, or give a factory as "
                "'package.module:function'"
            )
        return self

    @model_serializer
    def _short(self) -> Any:
        # The form a config would write: a bare name without settings (as studies fingerprinted it before).
        return self.name if not self.options else {self.name: dict(self.options)}

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_SETTINGS


def _split_betas(options: dict[str, Any]) -> dict[str, Any]:
    """`betas: [b1, b2]` (torch's form) as beta1 and beta2 (the form they are searched in)."""
    if "betas" not in options:
        return options
    betas = options.pop("betas")
    if not (isinstance(betas, list | tuple) and len(betas) == 2):
        raise ValueError(f"betas must be two numbers [beta1, beta2], got {betas!r}")
    return {"beta1": betas[0], "beta2": betas[1], **options}


def check_builtin_settings(optimizer: str, options: Mapping[str, Any], where: str) -> None:
    """Names, types and ranges of a built-in's settings (one line naming the bad one)."""
    known = BUILTIN_SETTINGS[optimizer]
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"{where}: {optimizer} has no setting {name!r}; it has {', '.join(known)}")
        check_setting(name, value, f"{where}.{name}")
    if options.get("nesterov") and (options.get("momentum") == 0 or options.get("dampening", 0) != 0):
        raise ValueError(f"{where}: nesterov needs momentum > 0 and dampening 0")


def check_setting(name: str, value: Any, where: str) -> None:
    """One built-in setting's value: a bool for flags, a number in its range otherwise."""
    flag = name in ("nesterov", "amsgrad")
    if flag != isinstance(value, bool) or not isinstance(value, bool | int | float):
        raise ValueError(f"{where} must be {'true or false' if flag else 'a number'}, got {value!r}")
    if flag:
        return
    x = float(value)
    ranges = {
        "momentum": (0.0 <= x < 1.0, "in [0, 1)"),
        "dampening": (0.0 <= x <= 1.0, "in [0, 1]"),
        "beta1": (0.0 <= x < 1.0, "in [0, 1)"),
        "beta2": (0.0 <= x < 1.0, "in [0, 1)"),
        "eps": (x > 0.0, "positive"),
        "weight_decay": (x >= 0.0, "at least 0"),
    }
    ok, wanted = ranges.get(name, (True, ""))
    if not math.isfinite(x) or not ok:
        raise ValueError(f"{where} must be {wanted or 'finite'}, got {value!r}")

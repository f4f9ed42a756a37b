"""The optimizer a run trains with: a built-in one with its settings, or a user's factory.

Built-ins (`TrainSpec.optimizer`): `sgd` (momentum, dampening, nesterov, weight_decay), `adam` and
`adamw` (beta1, beta2, eps, weight_decay, amsgrad). A factory is an import path `module:function`
called as `function(params, lr, **options) -> torch.optim.Optimizer`; `params` is the model's
trainable parameters in order (parameter groups, e.g. no weight decay on norms and biases via
`p.ndim < 2`, are the factory's business), `options` exactly the settings the config gives it.

`coupled_settings` scales settings with the batch size (the optimizer's side of `lr_scaling`):
weight decay keeps the AdamW timescale constant (Bergsma et al. 2025), Adam's betas and eps
follow the SDE scaling rule (Malladi et al. 2022).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# Each built-in's settings and their types: what a config may give or search (beta1 and beta2 are
# Adam's `betas`, searched one at a time). Kept free of torch: the sweep process checks configs.
BUILTIN_SETTINGS: dict[str, dict[str, type]] = {
    "sgd": {"momentum": float, "dampening": float, "nesterov": bool, "weight_decay": float},
    "adam": {"beta1": float, "beta2": float, "eps": float, "weight_decay": float, "amsgrad": bool},
    "adamw": {"beta1": float, "beta2": float, "eps": float, "weight_decay": float, "amsgrad": bool},
}
# The settings that have a batch-size rule (`coupled_settings`).
COUPLINGS = ("weight_decay", "beta1", "beta2", "eps")

OptimizerFactory = Callable[..., "torch.optim.Optimizer"]


def is_import_path(name: str) -> bool:
    """`package.module:function`, not a built-in name."""
    module, _, attr = name.partition(":")
    return bool(module and attr) and all(part.isidentifier() for part in (*module.split("."), attr))


def resolve_factory(path: str) -> OptimizerFactory:
    """Import `module:function` and check it can be called as function(params, lr, **options)."""
    if not is_import_path(path):
        raise ValueError(
            f"optimizer {path!r} is neither a built-in ({', '.join(BUILTIN_SETTINGS)}) nor an import path "
            "'package.module:function'."
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"optimizer {path!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"optimizer {path!r}: module {module_name!r} has no function {attr!r}.")
    return factory


def check_factory_options(path: str, factory: OptimizerFactory, names: Sequence[str]) -> None:
    """Refuse options the factory cannot take, before any trial runs."""
    try:
        signature = inspect.signature(factory)
    except ValueError:
        return  # no signature to inspect (a builtin): found out when it is called
    try:
        signature.bind(None, 1.0, **dict.fromkeys(names))
    except TypeError as exc:
        raise ValueError(
            f"optimizer {path!r} must accept (params, lr, **options) with options {sorted(names)}; "
            f"its signature is {attr_name(path)}{signature} ({exc})."
        ) from None


def attr_name(path: str) -> str:
    return path.partition(":")[2]


def base_settings(optimizer: str, momentum: float, weight_decay: float, options: Mapping[str, Any]) -> dict[str, Any]:
    """A run's optimizer settings before any batch-size coupling.

    Built-ins start from `train.momentum` (SGD) and `train.weight_decay`; `options` (the config's
    and the searched ones) come on top. A factory gets its options alone.
    """
    if optimizer not in BUILTIN_SETTINGS:
        return dict(options)
    start: dict[str, Any] = {"weight_decay": weight_decay}
    if optimizer == "sgd":
        start["momentum"] = momentum
    return start | dict(options)


def coupled_settings(
    settings: Mapping[str, Any], couple: Sequence[str], batch_size: int, reference_batch: int, lr: float, base_lr: float
) -> dict[str, Any]:
    """`settings` with those named in `couple` scaled from `reference_batch` to `batch_size`.

    κ = B / B_ref. Weight decay keeps the AdamW timescale τ = B / (η λ D) of the reference
    (Bergsma et al. 2025, "Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM
    Pre-training"): λ = λ_ref · κ · η_ref / η, with η_ref = `base_lr` (the sampled lr) and η = `lr`
    (after `lr_scaling`); under linear lr scaling λ stays, without lr scaling it grows with B.
    Adam's betas and eps follow the SDE scaling rule of Malladi et al. 2022 ("On the SDEs and
    Scaling Rules for Adaptive Gradient Algorithms"): 1 − β = κ (1 − β_ref), ε = ε_ref / √κ; a β
    the rule would take to zero or below (κ ≥ 1 / (1 − β_ref)) is held at 0, where the rule no
    longer holds (the paper's own limit).
    """
    if reference_batch < 1 or batch_size < 1:
        raise ValueError(f"batch sizes must be at least 1, got {batch_size=} and {reference_batch=}.")
    unknown = sorted(set(couple) - set(COUPLINGS))
    if unknown:
        raise ValueError(f"no batch-size rule for {unknown}; rules exist for {', '.join(COUPLINGS)}.")
    kappa = batch_size / reference_batch
    out = dict(settings)
    for name in couple:
        if name not in out:
            continue
        value = float(out[name])
        if name == "weight_decay":
            out[name] = value * kappa * base_lr / lr
        elif name in ("beta1", "beta2"):
            out[name] = max(0.0, 1.0 - kappa * (1.0 - value))
        else:  # eps
            out[name] = value / math.sqrt(kappa)
    return out


def make_optimizer(optimizer: str, model: nn.Module, lr: float, settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters, at learning rate `lr`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer not in BUILTIN_SETTINGS:
        made = resolve_factory(optimizer)(params, lr, **settings)
        if not hasattr(made, "step") or not hasattr(made, "param_groups"):
            raise ValueError(f"optimizer {optimizer!r} returned a {type(made).__name__}, not a torch.optim.Optimizer.")
        return made
    return _builtin(optimizer, params, lr, settings)


def _builtin(optimizer: str, params: list[Any], lr: float, settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    import torch

    unknown = sorted(set(settings) - set(BUILTIN_SETTINGS[optimizer]))
    if unknown:
        known = sorted(BUILTIN_SETTINGS[optimizer])
        raise ValueError(f"optimizer {optimizer!r} has no settings {unknown}; it has {known}.")
    kwargs = {k: v for k, v in settings.items() if k not in ("beta1", "beta2")}
    if optimizer != "sgd":
        kwargs["betas"] = (float(settings.get("beta1", 0.9)), float(settings.get("beta2", 0.999)))
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]

    # Fused kernels: one kernel per step for all parameters instead of several ops per tensor.
    # On CUDA one launch, and with fp16 the GradScaler hands them its inf check on the device
    # (no per-step host sync); on the CPU (torch >= 2.4) the step of a small model is 2-3.5x
    # faster (MNIST-1D MLP: SGD 118 -> 52 us, AdamW 340 -> 95 us). Devices or dtypes without
    # fused kernels get torch's default implementation.
    if params:
        try:
            return kind(params, lr=lr, fused=True, **kwargs)
        except RuntimeError:
            pass
    return kind(params, lr=lr, **kwargs)


def unwrap_scheduler_step(optimizer: torch.optim.Optimizer) -> None:
    """Undo the wrapper a scheduler puts around `optimizer.step`, once nothing reads what it records.

    torch's LRScheduler replaces the optimizer's `step` with a wrapper that records that it was
    called, read only at the scheduler's first step (to warn when the scheduler steps first); it
    costs ~1 µs a step at batch 16 on the CPU (a weakref, a bound method, *args). Call it where
    the scheduler never steps (a constant lr) or after its first step.
    """
    if getattr(vars(optimizer).get("step"), "_wrapped_by_lr_sched", False):
        del optimizer.step


def grad_resetter(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """`optimizer.zero_grad(set_to_none=True)`, decided once: the training step calls it every step.

    torch's own `zero_grad` sets each parameter's `.grad` to None inside a profiler range
    (`record_function`, ~4 µs to enter and leave even with no profiler running in torch 2.13) and
    builds a dict for the foreach/fused case it does not use with `set_to_none`: ~8-12 µs a step at
    batch 16 on the CPU. A plain loop over the optimizer's parameters does the same; an optimizer
    with its own `zero_grad` keeps it. The parameters are read once: the loop adds no groups.
    """
    import torch

    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        return lambda: optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    profiling = _profiler_check()

    def reset() -> None:
        if profiling():  # under torch.profiler: torch's own, with its "Optimizer.zero_grad" range
            optimizer.zero_grad(set_to_none=True)
            return
        for p in params:
            p.grad = None

    return reset


def step_function(optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
    """`optimizer.step()`, decided once, for a training step that calls it every step.

    torch wraps every optimizer's `step` (`Optimizer.profile_hook_step`) in a profiler range and the
    step hooks; the range alone (`record_function`) costs ~4 µs to enter and leave with no profiler
    running in torch 2.13, ~20 µs a step in the loop at batch 16 on the CPU. While no step hook is
    registered (on this optimizer or globally, checked at every call) the step runs without the
    wrapper; with any, through it. Relies on torch's private layout of that wrapper: where it is
    not found as expected (another torch), or a scheduler has wrapped the step, `optimizer.step`.
    """
    from torch.optim import optimizer as torch_optimizer

    wrapper = type(optimizer).step
    unwrapped = getattr(wrapper, "__wrapped__", None)
    pre = getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
    post = getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    own_pre = getattr(optimizer, "_optimizer_step_pre_hooks", None)
    own_post = getattr(optimizer, "_optimizer_step_post_hooks", None)
    hooks = (pre, post, own_pre, own_post)
    if (
        not getattr(wrapper, "hooked", False)
        or unwrapped is None
        or "step" in vars(optimizer)
        or any(not isinstance(h, dict) for h in hooks)
    ):
        return optimizer.step
    step = optimizer.step
    profiling = _profiler_check()

    def unwrapped_step() -> Any:
        if pre or post or own_pre or own_post or profiling():  # hooks to call, or a profile to label
            return step()
        return unwrapped(optimizer)

    return unwrapped_step


def _profiler_check() -> Callable[[], bool]:
    """Whether torch's autograd profiler (torch.profiler) is recording now (~0.03 µs to ask)."""
    import torch

    return getattr(torch.autograd, "_profiler_enabled", lambda: False)

"""A sweep config and one sampled point → the trial's `TrainSpec`, and the params logged for it.

The sweep, `batchscope train`, AutoBatch (sweeps.memory) and the `autobatch`/`throughput`
commands all build their specs here, so a config means the same training wherever it runs.
What the trainer resolves itself (micro-batch split under DDP, accumulation, effective lr,
device, precision) is logged by the trainer, not guessed here (DESIGN.md, one home per decision).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchscope.sweeps import memcap
from batchscope.sweeps.config import SweepConfig
from batchscope.sweeps.config_params import route
from batchscope.sweeps.devices import torch_has_gpu_support
from batchscope.sweeps.errors import UserError
from batchscope.trainers.optim import BUILTIN_SETTINGS
from batchscope.trainers.recipes import get_recipe
from batchscope.trainers.spec import TrainSpec


def slot_device(device: str, slot: int) -> str:
    """With several GPUs, parallel trial slots take one GPU each (cuda:0, cuda:1, ...)."""
    if device not in ("auto", "cuda") or not torch_has_gpu_support():
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return device
    return f"cuda:{slot % n}"


def make_spec(
    cfg: SweepConfig,
    batch_size: int,
    lr: float,
    seed: int,
    num_train: int | None = None,
    max_micro: int | None = None,
    searched: Mapping[str, Any] | None = None,
) -> TrainSpec:
    """The spec of one run; `searched` holds a trial's values of `search.params`, each routed to
    the optimizer, the trainer or the recipe (sweeps.config_params.route)."""
    t = cfg.train
    if t.max_steps is None and (t.max_samples is not None or t.max_epochs is not None) and num_train is None:
        num_train = _num_train(cfg)
    fixed = t.micro_batch_size if isinstance(t.micro_batch_size, int) else None
    # `auto`: split only the batches larger than what fits (max_micro, measured by AutoBatch).
    limit = fixed if fixed is not None else max_micro
    micro = limit if limit is not None and limit < batch_size else None
    routed = _routed(cfg, searched or {})
    optimizer_options = {**t.optimizer.options, **routed["optimizer"]}
    builtin = t.optimizer.builtin
    # A built-in's momentum and weight decay are the spec's own fields (logged as such), wherever given.
    momentum = float(optimizer_options.pop("momentum", t.momentum)) if builtin else t.momentum
    weight_decay = float(optimizer_options.pop("weight_decay", t.weight_decay)) if builtin else 0.0
    couple = tuple(name for name, space in cfg.search.params.items() if space.scale_with_batch)
    return TrainSpec(
        recipe=cfg.trainer.recipe,
        model=cfg.trainer.model,
        recipe_options={**cfg.trainer.options, **routed["recipe"]},
        batch_size=batch_size,
        micro_batch_size=micro,
        lr=lr,
        optimizer=t.optimizer.name,
        momentum=momentum,
        weight_decay=weight_decay,
        optimizer_options=optimizer_options,
        couple=couple,
        max_steps=t.steps_for(batch_size, num_train or 1),
        eval_every=t.eval_every,
        log_every=t.log_every,
        log_every_step=t.log_every_step,
        schedule=t.schedule,
        lr_scaling=t.lr_scaling.rule,
        reference_batch=t.lr_scaling.reference_batch,
        warmup_steps=int(routed["train"].get("warmup_steps", t.lr_scaling.warmup_steps)),
        target_metric=t.target.metric if t.target else None,
        target_value=t.target.value if t.target else None,
        stop_at_target=bool(t.target and t.target.stop),
        seed=seed,
        device=cfg.device,
        precision=cfg.precision,
        compile=t.compile,
        gns=t.gns.enabled,
        gns_every=None if t.gns.every == "auto" else t.gns.every,
        gns_budget=t.gns.max_overhead,
        gns_window=None if t.gns.window == "auto" else t.gns.window,
        divergence_factor=t.divergence_factor,
        sharpness=t.sharpness.enabled,
        sharpness_iters=t.sharpness.iters,
        sharpness_tol=t.sharpness.tol,
    )


def _routed(cfg: SweepConfig, searched: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"optimizer": {}, "train": {}, "recipe": {}}
    if not searched:
        return out
    recipe = get_recipe(cfg.trainer.recipe).options
    fields = None if recipe.model_config.get("extra") == "allow" else tuple(recipe.model_fields)
    for name, value in searched.items():
        goes = route(name, cfg.train.optimizer.name, fields)
        if goes is None:
            raise UserError(f"search.params: {name} is not a setting this sweep can apply")
        out[goes][name] = value
    return out


def budget_num_train(cfg: SweepConfig) -> int | None:
    """The training-set size when the budget is in samples or epochs (needed to count steps), else None."""
    t = cfg.train
    return _num_train(cfg) if t.max_steps is None and (t.max_samples or t.max_epochs) else None


def _num_train(cfg: SweepConfig) -> int:
    # Sample and epoch budgets need the training-set size; recipes know it without building the model.
    recipe = get_recipe(cfg.trainer.recipe)
    opts = recipe.options.model_validate(cfg.trainer.options)
    if recipe.num_train is not None:
        return int(recipe.num_train(opts))
    n = getattr(opts, "num_samples", None)
    split = getattr(opts, "train_split", 1.0)
    if not n:
        raise UserError(
            f"train.max_epochs/max_samples need the training-set size, which recipe {cfg.trainer.recipe!r} "
            "does not give (Recipe.num_train); use train.max_steps"
        )
    return int(n * split)


# trainers.device.resolve_precision on the CPU, where it needs no torch.
_CPU_PRECISION = {"auto": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def planned_device(device: str, precision: str) -> tuple[str, str]:
    """The device and precision a trial will train with, as the worker resolves them (trainers.device)."""
    if device in ("auto", "cpu") and precision in _CPU_PRECISION and not torch_has_gpu_support():
        return "cpu", _CPU_PRECISION[precision]
    from batchscope.trainers.device import resolve_device, resolve_precision

    resolved = resolve_device(device)
    return str(resolved), resolve_precision(precision, resolved)


def run_params(spec: TrainSpec, cfg: SweepConfig) -> dict[str, Any]:
    """The contract's child-run params that the sweep decides.

    What the trainer resolves (device, precision, micro-batch, accumulation steps, effective lr,
    world size) it logs itself through its sink before the first step (trainers.loop): guessed
    here, a DDP trial's micro-batch was logged as the whole batch while each process saw half.
    """
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.recipe_options.items()))
    return {
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "optimizer": spec.optimizer,
        "momentum": spec.momentum if spec.optimizer == "sgd" else None,
        "weight_decay": spec.weight_decay if spec.optimizer in BUILTIN_SETTINGS else None,
        # The other settings, each under its own name (beta1, eps, a factory's options, ...).
        **{name: spec.optimizer_options[name] for name in sorted(spec.optimizer_options)},
        # Searched recipe options under their own names too.
        **{name: spec.recipe_options[name] for name in cfg.search.params if name in spec.recipe_options},
        "seed": spec.seed,
        "trainer": spec.recipe,
        "model": spec.model,
        "dataset": f"{spec.recipe}({opts})" if opts else spec.recipe,
        "max_steps": spec.max_steps,
        "eval_every": spec.eval_every,
        "lr_scaling": spec.lr_scaling,
        "reference_batch": spec.reference_batch,
        "warmup_steps": spec.warmup_steps,
        "schedule": spec.schedule,
        "target": f"{spec.target_metric}={spec.target_value}" if spec.target_metric else None,
        "gns": spec.gns,
        # With the cadence chosen from timed steps (None here) the chosen one is logged at the end.
        "gns_every": spec.gns_every if spec.gns else None,
        "gns_max_overhead": spec.gns_budget if spec.gns and spec.gns_every is None else None,
        "divergence_factor": spec.divergence_factor,
    }


def memory_cap(cfg: SweepConfig, trials_at_once: int) -> float | None:
    """A CPU trial's memory cap in MB: `train.memory_limit_mb`, else a share of the memory available
    now split between the trials at a time (sweeps.memcap); none on a GPU or under torchrun."""
    if cfg.train.distributed.nproc > 1:
        return None
    if cfg.train.memory_limit_mb is not None:
        return float(cfg.train.memory_limit_mb)
    device, _ = planned_device(cfg.device, cfg.precision)
    return memcap.default_cap_mb(trials_at_once) if device == "cpu" else None

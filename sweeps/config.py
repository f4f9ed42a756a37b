"""The sweep config's schema: every key, its type, its bounds and the checks across keys.

Reading a file and `--set` overrides are sweeps.config_load's; the device check is sweeps.devices'.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from batchscope.sweeps.config_bounds import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_STEPS,
    MAX_TRIALS,
    SEED_MAX,
    batch_problem,
    budget_problem,
    train_size_without_torch,
)
from batchscope.sweeps.config_optim import OptimizerChoice
from batchscope.sweeps.config_params import ParamSpace, check_searched, evenly_spaced
from batchscope.sweeps.devices import check_cuda
from batchscope.trainers.recipes import get_recipe


def _to_float(value: Any) -> Any:
    # YAML 1.1 reads `1e-3` (no dot) as a string; accept numeric strings and ints, refuse bools.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


def _seed_in_range(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"a seed must be between 0 and 2**32 - 1 = {SEED_MAX} (numpy's range), got {seed}")
    return seed


Float = Annotated[float, BeforeValidator(_to_float)]
PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, AfterValidator(_seed_in_range)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


class _Strict(BaseModel):
    # allow_inf_nan=False: an inf or nan (YAML's .inf, .nan) is refused wherever a number is read,
    # rather than training to a "divergence" or a target that can never hold.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# ---- trainer ---------------------------------------------------------------


class TrainerConfig(BaseModel):
    """`trainer: {recipe, model, ...recipe options}`; options are checked by the recipe."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    recipe: str = "mnist1d"
    model: str = "mlp"

    @model_validator(mode="after")
    def _check_recipe(self) -> TrainerConfig:
        recipe = get_recipe(self.recipe)  # ValueError with the known names (or the import problem)
        if self.model not in recipe.models:
            raise ValueError(
                f"recipe {self.recipe!r} has no model {self.model!r}; choose one of: {', '.join(recipe.models)}"
            )
        recipe.options.model_validate(self.options)
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# ---- train -----------------------------------------------------------------


class Target(_Strict):
    metric: str = "val/acc"
    value: Float
    # Stop the trial as soon as the target holds (default: train to the budget).
    stop: bool = False


class LrScaling(_Strict):
    rule: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: BatchSize = 128
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 0


class NoiseScaleConfig(_Strict):
    enabled: bool = True
    # Measure on every n-th step, or "auto": chosen per run from a few timed steps so that measuring
    # costs about `max_overhead` of the training time (without accumulation a measuring step splits
    # its batch in two: nearly free on a GPU-bound model, about a second step on a small CPU model).
    every: Steps | Literal["auto"] = "auto"
    max_overhead: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.02
    # B_simple at an evaluation is the ratio of the means of |G|² and tr(Σ) measured over this many
    # last steps, with its standard error; the same window in every trial. auto: 4 × eval_every.
    window: Steps | Literal["auto"] = "auto"


class SharpnessConfig(_Strict):
    enabled: bool = True
    # Power iteration converges in tens of products; 10,000 is a typo's bound, not a tuning one.
    iters: Annotated[int, Field(ge=1, le=10_000)] = 20
    tol: Annotated[Float, Field(gt=0.0)] = 1e-3


class CheckpointConfig(_Strict):
    # Save every n steps and/or every m minutes (at the next evaluation point); null for neither.
    every_steps: Steps | None = None
    every_minutes: Annotated[Float, Field(gt=0.0)] | None = 5.0
    # Checkpoints of finished trials: keep the best trial's, all, or none. Kept final weights go to MLflow.
    keep: Literal["best", "all", "none"] = "best"


class DistributedConfig(_Strict):
    # Processes per trial, started by torchrun (data parallel: NCCL on CUDA, gloo on CPU);
    # batch sizes must be divisible by it. DDP trials are not pruned.
    nproc: PositiveInt = 1


class TrainConfig(_Strict):
    # sgd | adam | adamw, {adamw: {betas: [0.9, 0.95], ...}}, or a factory 'module:function' (sweeps.config_optim).
    optimizer: OptimizerChoice = OptimizerChoice()
    # The built-ins' momentum (sgd) and weight decay; also settable among train.optimizer's settings.
    momentum: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[Float, Field(ge=0.0)] = 0.0
    # The budget: exactly one of steps, samples or epochs (default 1000 steps).
    # Checked against MAX_STEPS for the smallest batch by SweepConfig (samples and epochs need it).
    max_steps: Steps | None = None
    max_samples: Annotated[int, Field(ge=1, le=MAX_STEPS * MAX_BATCH)] | None = None
    max_epochs: Annotated[Float, Field(gt=0.0, le=MAX_EPOCHS)] | None = None
    eval_every: Steps = 50
    log_every: Steps = 10
    # true: every step's train/loss in the stores; false: one row per logging window (mean, min, max).
    log_every_step: bool = False
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    target: Target | None = None
    lr_scaling: LrScaling = LrScaling()
    # Each seed is a whole training run of every trial: a thousand is already weeks of repeats.
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=1000)] = [0]
    # Split batches into micro-batches of this size (gradient accumulation, same effective batch);
    # `auto`: only batches that do not fit memory are split, at the size AutoBatch measures.
    micro_batch_size: BatchSize | Literal["auto"] | None = None
    # For `batchscope train`: the batch size, or `auto` for the largest that fits (AutoBatch).
    batch_size: BatchSize | Literal["auto"] | None = None
    gns: NoiseScaleConfig = NoiseScaleConfig()
    sharpness: SharpnessConfig = SharpnessConfig()
    compile: bool = False
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    # CPU: cap each trial worker's memory (MB above its start-up size); a batch that does not fit
    # then ends its trial as `oom` instead of swapping the machine. null: a share of the available
    # memory (sweeps.memcap). At least 64 MB (less cannot hold a model), at most 2**30 MB (a petabyte).
    memory_limit_mb: Annotated[Float, Field(ge=64.0, le=float(2**30))] | None = None
    # A training loss above this many times its first value ends a trial as diverged, like NaN or
    # inf (a loss that explodes to 1e18 is not a result). null: only NaN and inf.
    divergence_factor: Annotated[Float, Field(gt=1.0)] | None = 100.0

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        given = [k for k in ("max_steps", "max_samples", "max_epochs") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        return self

    @model_validator(mode="after")
    def _optimizer_settings_once(self) -> TrainConfig:
        for name in ("momentum", "weight_decay"):
            if name not in self.model_fields_set:
                continue
            if not self.optimizer.builtin:
                raise ValueError(f"train.{name} is for the built-in optimizers; give it among the factory's options")
            if name in self.optimizer.options:
                raise ValueError(f"train.{name} is also among train.optimizer's settings; give it in one place")
        return self

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    def steps_for(self, batch_size: int, num_train: int) -> int:
        """The step budget for one batch size (a sample or epoch budget gives larger batches fewer steps)."""
        if self.max_samples is not None:
            return max(1, -(-self.max_samples // batch_size))  # integer ceil: no float overflow
        if self.max_epochs is not None:
            return max(1, math.ceil(self.max_epochs * num_train / batch_size))
        return self.max_steps or 1000


# ---- search ----------------------------------------------------------------


class BatchValues(_Strict):
    values: Annotated[list[BatchSize], Field(min_length=1)]

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"batch sizes must be distinct, got {values}")
        return sorted(values)

    def choices(self) -> list[int]:
        return list(self.values)


class BatchRange(_Strict):
    """Powers of two from `low` to `high`; `high: auto` is the largest batch that fits (AutoBatch)."""

    low: BatchSize
    high: BatchSize | Literal["auto"]
    log: Literal[True] = True

    @model_validator(mode="after")
    def _order(self) -> BatchRange:
        if self.high == "auto":
            return self
        if self.low > self.high:
            raise ValueError(f"low must be ≤ high, got low={self.low} and high={self.high}")
        if not self.choices():
            raise ValueError(f"no power of two lies between low={self.low} and high={self.high}")
        return self

    def choices(self) -> list[int]:
        if self.high == "auto":
            raise ValueError("search.batch_size.high is 'auto': resolve it with AutoBatch first")
        out, b = [], 1
        while b <= self.high:
            if b >= self.low:
                out.append(b)
            b *= 2
        return out


class LrValues(_Strict):
    values: Annotated[list[Annotated[Float, Field(gt=0.0)]], Field(min_length=1)]

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[float]) -> list[float]:
        # A repeated value would train the same (batch size, lr) twice under the grid sampler.
        if len(set(values)) != len(values):
            raise ValueError(f"learning rates must be distinct, got {values}")
        return values


class LrRange(_Strict):
    low: Annotated[Float, Field(gt=0.0)]
    high: Annotated[Float, Field(gt=0.0)]
    log: bool = True
    # Only for the grid sampler: how many (log-)evenly spaced values to try (every one at every batch size).
    grid_points: Annotated[int, Field(ge=2, le=1000)] = 5

    @model_validator(mode="after")
    def _order(self) -> LrRange:
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got low={self.low} and high={self.high}")
        return self

    def grid(self) -> list[float]:
        return [float(f"{x:.6g}") for x in evenly_spaced(self.low, self.high, self.grid_points, self.log)]


def _values_or_range(raw: Any) -> str:
    # Pick the union member from the keys given, so errors speak of that member only.
    if isinstance(raw, dict):
        return "by-values" if "values" in raw else "by-range"
    return "by-range" if hasattr(raw, "low") else "by-values"


BatchSpace = Annotated[
    Annotated[BatchValues, Tag("by-values")] | Annotated[BatchRange, Tag("by-range")], Discriminator(_values_or_range)
]
LrSpace = Annotated[
    Annotated[LrValues, Tag("by-values")] | Annotated[LrRange, Tag("by-range")], Discriminator(_values_or_range)
]

Objective = Literal["val_loss", "val_acc", "steps_to_target", "time_to_target"]


class StopWhen(_Strict):
    """`search.stop_when` (sampler: frontier): stop asking for trials once B_crit's 95% interval,
    (high − low)/B_crit, is at most this and every batch size's best lr is bracketed."""

    b_crit_rel_ci: Annotated[Float, Field(gt=0.0, lt=10.0)]


class SearchConfig(_Strict):
    batch_size: BatchSpace = BatchValues(values=[16, 32, 64, 128, 256, 512, 1024])
    lr: LrSpace = LrRange(low=1e-3, high=1.0)
    # More hyperparameters searched with these two (sweeps.config_params).
    params: dict[str, ParamSpace] = {}
    sampler: Literal["tpe", "grid", "random", "frontier"] = "tpe"
    stop_when: StopWhen | None = None
    # auto: FrontierPruner under sampler: frontier with objective steps_to_target, else none.
    pruner: Literal["auto", "none", "median", "successive_halving", "hyperband"] = "auto"
    n_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = 24
    # What Optuna optimizes; two names give a Pareto front (no pruning then).
    objective: Objective | Annotated[list[Objective], Field(min_length=1, max_length=2)] = "val_loss"
    # val_loss / val_acc: the mean over each run's last N evaluations (1: the final evaluation alone).
    objective_evals: PositiveInt = 4
    seed: Seed | None = 0

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if len(self.objectives) == 2 and self.pruner not in ("none", "auto"):
            raise ValueError("pruning works with one objective only; set pruner: none for two objectives")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must differ, got {self.objectives}")
        if self.stop_when is not None and self.sampler != "frontier":
            raise ValueError(f"stop_when works with sampler: frontier only, got sampler: {self.sampler}")
        if self.sampler == "frontier" and len(self.objectives) != 1:
            raise ValueError(f"sampler: frontier searches one objective, got {self.objectives}")
        return self

    @property
    def objectives(self) -> list[str]:
        return [self.objective] if isinstance(self.objective, str) else list(self.objective)

    def batch_choices(self) -> list[int]:
        return self.batch_size.choices()

    def lr_choices(self) -> list[float] | None:
        """Discrete learning rates, or None for a continuous range (except under grid)."""
        if isinstance(self.lr, LrValues):
            return list(self.lr.values)
        return self.lr.grid() if self.sampler == "grid" else None


# ---- the whole sweep -------------------------------------------------------

_STUDY_NAME = re.compile(r"^[^\x00-\x1f/\\]{1,200}$")


class ReportConfig(_Strict):
    # Write the comparison report when the sweep ends.
    auto: bool = True
    out_dir: str = "reports"

    @field_validator("out_dir")
    @classmethod
    def _a_folder_name(cls, out_dir: str) -> str:
        # Checked now: the report is written after the sweep, when a bad path would only be a warning.
        if not out_dir.strip() or "\x00" in out_dir:
            raise ValueError(f"give a folder for the report, got {out_dir!r}")
        return out_dir


class HeartbeatConfig(_Strict):
    """Dead-worker detection with a database storage: a trial silent for `grace_s` is re-run."""

    interval_s: PositiveInt = 30
    grace_s: PositiveInt = 120

    @model_validator(mode="after")
    def _grace(self) -> HeartbeatConfig:
        if self.grace_s <= self.interval_s:
            raise ValueError(
                f"grace_s must exceed interval_s, got grace_s={self.grace_s}, interval_s={self.interval_s}"
            )
        return self


class SweepConfig(_Strict):
    study: str
    trainer: TrainerConfig = TrainerConfig()
    train: TrainConfig = TrainConfig()
    search: SearchConfig = SearchConfig()
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    storage: str | None = None
    tracking_uri: str | None = None
    report: ReportConfig = ReportConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()

    @field_validator("study")
    @classmethod
    def _study_name(cls, name: str) -> str:
        if not _STUDY_NAME.match(name) or not name.strip():
            raise ValueError(f"study name must be 1–200 printable characters without '/' or '\\', got {name!r}")
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda"):
            check_cuda(device)
        return device

    @model_validator(mode="after")
    def _target_metric(self) -> SweepConfig:
        target = self.train.target
        recipe = get_recipe(self.trainer.recipe)
        if target is not None and target.metric not in recipe.metrics:
            raise ValueError(
                f"train.target.metric {target.metric!r} is not produced by recipe {self.trainer.recipe!r}; "
                f"choose one of: {', '.join(recipe.metrics)}"
            )
        nproc = self.train.distributed.nproc
        sizes = self.searched_batch_sizes()
        odd = [b for b in sizes if b % nproc]
        if nproc > 1 and odd:
            raise ValueError(
                f"search.batch_size: with train.distributed.nproc={nproc} every batch size must be divisible "
                f"by {nproc}; these are not: {odd}"
            )
        needs_target = {"steps_to_target", "time_to_target"} & set(self.search.objectives)
        if needs_target and target is None:
            raise ValueError(f"objective {sorted(needs_target)[0]} needs train.target to be set")
        if self.search.stop_when is not None and target is None:
            raise ValueError("search.stop_when fits B_crit to the steps to train.target: set train.target")
        return self

    @model_validator(mode="after")
    def _within_bounds(self) -> SweepConfig:
        num_train = train_size_without_torch(self.trainer)
        if num_train is not None and num_train < 1:
            raise ValueError(
                f"trainer: these options of recipe {self.trainer.recipe!r} leave no training examples; "
                "give it more data or a larger training split"
            )
        sizes = self.searched_batch_sizes()
        fixed = self.train.batch_size
        named = [("search.batch_size", max(sizes))] + ([("train.batch_size", fixed)] if isinstance(fixed, int) else [])
        for field, batch in named:
            problem = batch_problem(batch, num_train)
            if problem:
                raise ValueError(f"{field}: {problem}")
        # The smallest batch takes the most steps under a sample or epoch budget.
        problem = budget_problem(self.train, min(sizes), num_train)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _searched_params(self) -> SweepConfig:
        if self.search.params:
            check_searched(self)
        return self

    def searched_batch_sizes(self) -> list[int]:
        """The batch sizes the search may try (with `high: auto`, its low end only: the rest is measured)."""
        bs = self.search.batch_size
        if isinstance(bs, BatchValues):
            return list(bs.values)
        return [bs.low] if bs.high == "auto" else bs.choices()


def config_to_dict(cfg: SweepConfig) -> dict[str, Any]:
    """The resolved config as plain data (for logging and the study's fingerprint)."""
    d = cfg.model_dump(mode="json")
    d["trainer"] = {"recipe": cfg.trainer.recipe, "model": cfg.trainer.model, **cfg.trainer.options}
    return d

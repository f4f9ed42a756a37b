"""Sweep definitions: YAML validated strictly, with `--set key=value` overrides.

Every mistake is reported with the field's path and the bad value, before
anything is created on disk.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import stat
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from batchscope.sweeps.errors import UserError
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


# Bounds on what a config can mean. Past them a number is a typo, and it would run until killed
# (or take the machine's memory) instead of being refused in one line.
# numpy takes seeds in [0, 2**32 - 1], and the recipes seed numpy with them.
SEED_MAX = 2**32 - 1
# Examples in one step: 2**8 times the largest batches of Shallue et al. 2019 (2**16).
MAX_BATCH = 2**24
# Steps in one run: a thousand times a long language-model pre-training (about 10**6 steps).
MAX_STEPS = 10**9
# Epochs in one run: ten times the longest runs on tiny data (grokking studies reach about 10**5).
MAX_EPOCHS = 10**6
# A batch may span several epochs (trainers.data.DeviceBatcher), so a search space may reach past
# the training set (a power-of-two grid overshoots it, memory probes go further); past this many
# copies of every example in each step the batch size no longer means anything.
MAX_BATCH_PER_TRAIN_SET = 1024
# Trials in one study: a million real training runs of a second or more each is weeks of compute.
MAX_TRIALS = 10**6


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
    optimizer: Literal["sgd", "adamw"] = "sgd"
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
        n = self.grid_points
        if self.log:
            a, b = math.log10(self.low), math.log10(self.high)
            return [float(f"{10 ** (a + (b - a) * i / (n - 1)):.6g}") for i in range(n)]
        return [float(f"{self.low + (self.high - self.low) * i / (n - 1):.6g}") for i in range(n)]


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
            _check_cuda(device)
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
            problem = _batch_problem(batch, num_train)
            if problem:
                raise ValueError(f"{field}: {problem}")
        # The smallest batch takes the most steps under a sample or epoch budget.
        problem = _budget_problem(self.train, min(sizes), num_train)
        if problem:
            raise ValueError(problem)
        return self

    def searched_batch_sizes(self) -> list[int]:
        """The batch sizes the search may try (with `high: auto`, its low end only: the rest is measured)."""
        bs = self.search.batch_size
        if isinstance(bs, BatchValues):
            return list(bs.values)
        return [bs.low] if bs.high == "auto" else bs.choices()


# ---- bounds that need more than one field ------------------------------------------

# Recipes whose training-set size follows from their options alone. cifar10 and charlm count
# their data files (their modules import torch), which validation does not do: their batches
# are bounded by MAX_BATCH only.
_SIZE_FROM_OPTIONS = frozenset({"mnist1d", "digits"})


def train_size_without_torch(trainer: TrainerConfig) -> int | None:
    """The training-set size where the options give it without reading data, else None."""
    recipe = get_recipe(trainer.recipe)
    if trainer.recipe not in _SIZE_FROM_OPTIONS or recipe.num_train is None:
        return None
    return int(recipe.num_train(recipe.options.model_validate(trainer.options)))


def _batch_problem(batch_size: int, num_train: int | None) -> str | None:
    if batch_size > MAX_BATCH:
        return f"a batch size must be at most 2**24 = {MAX_BATCH:,}, got {batch_size:,}"
    if num_train is not None and batch_size > MAX_BATCH_PER_TRAIN_SET * num_train:
        return (
            f"a batch of {batch_size:,} repeats each of the {num_train:,} training examples more than "
            f"{MAX_BATCH_PER_TRAIN_SET} times per step; at most {MAX_BATCH_PER_TRAIN_SET * num_train:,} here"
        )
    return None


def _budget_problem(train: TrainConfig, batch_size: int, num_train: int | None) -> str | None:
    """Whether a sample or epoch budget means more than MAX_STEPS steps at this batch size."""
    if train.max_samples is not None:
        field, value = "max_samples", f"{train.max_samples:,}"
    elif train.max_epochs is not None and num_train is not None:
        field, value = "max_epochs", f"{train.max_epochs:g}"
    else:
        return None  # max_steps is bounded by its own field; epochs of unknown data cannot be counted
    steps = train.steps_for(batch_size, num_train or 1)
    if steps <= MAX_STEPS:
        return None
    return (
        f"train.{field}: {value} is {steps:.3g} steps at batch size {batch_size}; "
        f"a run may take at most {MAX_STEPS:,} steps: lower train.{field}"
    )


def check_batch_size(cfg: SweepConfig, batch_size: int, source: str) -> None:
    """A batch size given outside the config (`batchscope train --batch-size`), held to the config's bounds."""
    num_train = train_size_without_torch(cfg.trainer)
    problem = _batch_problem(batch_size, num_train) or _budget_problem(cfg.train, batch_size, num_train)
    if problem:
        raise UserError(f"{source} {batch_size}: {problem}")


# ---- the device, checked here rather than when the first trial starts ------------------


@functools.cache
def torch_has_gpu_support() -> bool:
    """Whether the installed PyTorch was built with CUDA or ROCm, read from torch/version.py.

    Without either, torch.cuda.is_available() is False: a config that names no CUDA device is
    checked without importing torch (1–2 s of start-up).
    """
    found = importlib.util.find_spec("torch")
    locations = list(found.submodule_search_locations or []) if found is not None else []
    try:
        text = (Path(locations[0]) / "version.py").read_text(encoding="utf-8")
    except (IndexError, OSError, UnicodeDecodeError):
        return True  # cannot tell: ask torch itself
    builds = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.*?)\s*$", text, flags=re.MULTILINE))
    return builds.get("cuda") != "None" or builds.get("hip") != "None"


def cuda_device_count() -> int:
    """CUDA (or ROCm) devices on this machine; torch is imported only when its build has GPU support."""
    if not torch_has_gpu_support():
        return 0
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _check_cuda(device: str) -> None:
    count = cuda_device_count()
    if count == 0:
        raise ValueError(f"{device!r}: there is no CUDA device on this machine; set device: auto or cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ValueError(
            f"{device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
            "set device: cuda, cuda:N with N below that, or auto"
        )


# ---- loading -----------------------------------------------------------------


def _off_the_mark(err: Mapping[str, Any]) -> bool:
    """A union member of another kind than the value given (a name, for a list of names): its
    error says least about what is wrong, so it comes after the others (a stable sort)."""
    kind_mismatch = err.get("type") == "literal_error" or str(err.get("type", "")).endswith("_type")
    return kind_mismatch and isinstance(err.get("input"), list | dict)


def _location(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
    # Pydantic names union members in the path (tags, types); drop those for readability.
    loc = re.sub(r"\.by-(values|range)(?=\.|$)", "", loc)
    return re.sub(r"\.(list\[.*?\]|str|int|float|literal\[.*?\]|constrained-\w+)(?=\.|$)", "", loc)


def _format_error(err: Mapping[str, Any]) -> str:
    loc = _location(err)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (check the spelling; see sweeps/configs/ for the keys)"
    elif "input" in err and err.get("type") not in ("missing",):
        value = err["input"]
        if not isinstance(value, dict | list | BaseModel) and len(repr(value)) < 80 and repr(value) not in msg:
            msg = f"{msg} (got {value!r})"
    return f"{loc}: {msg}" if loc else msg


def validate(raw: Any, source: str) -> SweepConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a sweep config must be a YAML mapping, got {type(raw).__name__}")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {_one_line(exc.errors())}") from None


def _one_line(errors: Sequence[Mapping[str, Any]]) -> str:
    errors = sorted(errors, key=_off_the_mark)
    first = _format_error(errors[0])
    loc = _location(errors[0])
    # A union (`every: 10 | auto`) gives one error per member at the same place: say the alternatives.
    alternatives = [e for e in errors[1:] if _location(e) == loc and e.get("type") == "literal_error"]
    if alternatives and len(alternatives) == len(errors) - 1:
        names = [str(e["msg"]).removeprefix("Input should be ") for e in alternatives]
        return first + "".join(f", or {'one of ' if ' or ' in n else ''}{n}" for n in names)
    return first + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Hashable, first_line: int, second_line: int) -> None:
        super().__init__(f"the key {key!r} is given twice, on lines {first_line} and {second_line}; keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error
    (PyYAML keeps the last one without a word: `study:` twice silently renames the study)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key is what merge keys are for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise _DuplicateKey(key, seen[key], line)
            if isinstance(key, Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except (ValueError, RecursionError) as exc:
        # Not YAMLError: an integer of thousands of digits (Python's int() limit), or nesting deeper
        # than the recursion limit. Neither is a sweep config.
        problem = str(exc).split(";")[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise yaml.YAMLError(problem) from None


# A sweep config is a page of YAML; a bigger file is the wrong file (a dataset, a checkpoint).
_MAX_CONFIG_BYTES = 1_000_000


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        info = p.stat()
    except FileNotFoundError:
        raise UserError(
            f"config file {str(p)!r} does not exist; give the path to a sweep YAML (see sweeps/configs/)"
        ) from None
    except OSError as exc:  # a name too long, a symlink loop, a folder we may not enter
        raise UserError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"config {str(p)!r} is a folder; give the path to a sweep YAML file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or a device (/dev/zero) would block or never end.
        raise UserError(f"config {str(p)!r} is not a regular file; give the path to a sweep YAML file")
    try:
        size = info.st_size
        if size > _MAX_CONFIG_BYTES:
            raise UserError(
                f"config file {str(p)!r} is {size:,} bytes, not a sweep config (at most {_MAX_CONFIG_BYTES:,})"
            )
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {str(p)!r} cannot be read: {exc}") from None
    if "\x00" in text:
        raise UserError(f"config file {str(p)!r} is binary, not YAML; give the path to a sweep YAML file")
    try:
        raw = _parse_yaml(text)
    except _DuplicateKey as exc:
        raise UserError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc) or "invalid YAML"
        raise UserError(f"{p}: bad YAML{where}: {problem}") from None
    if raw is None:
        raise UserError(f"{p}: the file is empty; a sweep config needs at least `study:`")
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a sweep config must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _known_paths(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (`300`, `[0, 1]`, `true`)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=300")
        key, _, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise UserError(f"--set {item!r}: the key {key!r} is not a dotted path like train.max_steps")
        _check_key_exists(parts, item)
        try:
            value = _parse_yaml(text) if text.strip() else None
        except _DuplicateKey as exc:
            raise UserError(f"--set {item!r}: {exc}") from None
        except yaml.YAMLError:
            value = text
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
                node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def _check_key_exists(parts: list[str], item: str) -> None:
    """Refuse `--set` keys the schema does not have (trainer options are checked by the recipe)."""
    model: Any = SweepConfig
    for i, p in enumerate(parts):
        if model is TrainerConfig and p not in TrainerConfig.model_fields:
            return  # recipe option, validated with the whole config
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return  # inside a free-form value (a list or a union member's fields)
        if p not in fields:
            path = ".".join(parts[: i + 1])
            raise UserError(
                f"--set {item!r}: there is no config key {path!r}; known keys here: {', '.join(sorted(fields))}"
            )
        annotation = fields[p].annotation
        model = _model_of(annotation)
        if model is None:
            if i < len(parts) - 1:
                # A union of models (batch_size: values | low/high) or a plain value: allow any sub-key of a member.
                members = _union_models(annotation)
                if members:
                    sub = parts[i + 1]
                    if not any(sub in m.model_fields for m in members):
                        keys = sorted({k for m in members for k in m.model_fields})
                        raise UserError(
                            f"--set {item!r}: there is no config key {'.'.join(parts[: i + 2])!r}; "
                            f"known keys here: {', '.join(keys)}"
                        )
                    return
                raise UserError(f"--set {item!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
            return


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = _union_models(annotation)
    # `Target | None`: one model in a union with None.
    if len(members) == 1 and type(None) in getattr(annotation, "__args__", ()):
        return members[0]
    return None


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    args = [_strip_annotated(a) for a in get_args(_strip_annotated(annotation))]
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, override and validate a sweep config; raises UserError with one clear line."""
    raw = apply_overrides(read_yaml(path), overrides)
    return validate(raw, str(path))


def config_to_dict(cfg: SweepConfig) -> dict[str, Any]:
    """The resolved config as plain data (for logging and the study's fingerprint)."""
    d = cfg.model_dump(mode="json")
    d["trainer"] = {"recipe": cfg.trainer.recipe, "model": cfg.trainer.model, **cfg.trainer.options}
    return d

"""Plain descriptions of one training run and of its outcome.

`trainers/` knows nothing of Optuna or MLflow: a sweep turns a trial into a
`TrainSpec`, the loop reports through a `Sink`, and returns a `TrainResult`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "pruned", "diverged", "oom", "failed"]


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training run needs, in plain values (logged whole)."""

    recipe: str = "mnist1d"
    model: str = "mlp"
    recipe_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 128
    # None: the whole batch in one forward pass; otherwise gradient accumulation.
    micro_batch_size: int | None = None
    lr: float = 0.1
    # A built-in (sgd, adam, adamw) or a factory's import path `module:function` (trainers/optim.py).
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd's
    weight_decay: float = 0.0  # a built-in's (a factory's is among its options)
    # The optimizer's other settings (betas as beta1/beta2, eps, nesterov, ...; a factory's options).
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    # Settings scaled with the batch size from `reference_batch` (trainers.optim.coupled_settings).
    couple: tuple[str, ...] = ()
    max_steps: int = 1000
    eval_every: int = 50
    # How often the per-step losses are copied to the host and handed to the sink.
    log_every: int = 10
    # What reaches the sink for `train/loss`: False (default), one row per logging window (its
    # mean as `train/loss`, with `train/loss_min` and `train/loss_max`, at the window's last
    # step); True, every step's loss. Windows write a tenth of the rows (MLflow's cost is per row);
    # divergence is checked on every step either way.
    log_every_step: bool = False
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = 128
    warmup_steps: int = 0
    target_metric: str | None = None
    target_value: float | None = None
    stop_at_target: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    gns: bool = True
    # Measure on every n-th step; None: chosen from timed steps so that measuring costs about
    # `gns_budget` of the training time (without accumulation a measuring step splits its batch).
    gns_every: int | None = None
    gns_budget: float = 0.02
    # B_simple at an evaluation is over the measurements of this many last steps (None: 4 × eval_every).
    gns_window: int | None = None
    # A training loss above this many times its first value ends the run as diverged (None: only NaN/inf).
    divergence_factor: float | None = 100.0
    sharpness: bool = True
    sharpness_iters: int = 20
    sharpness_tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size=}.")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ValueError(
                "micro_batch_size must be between 1 and batch_size, "
                f"got {self.micro_batch_size=} with {self.batch_size=}."
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr=}.")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps=}.")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every=}.")
        if self.log_every < 1:
            raise ValueError(f"log_every must be at least 1, got {self.log_every=}.")
        if self.gns_every is not None and self.gns_every < 1:
            raise ValueError(f"gns_every must be at least 1 (or None to choose it), got {self.gns_every=}.")
        if not 0.0 < self.gns_budget <= 1.0:
            raise ValueError(f"gns_budget must be in (0, 1], got {self.gns_budget=}.")
        if self.gns_window is not None and self.gns_window < 1:
            raise ValueError(f"gns_window must be at least 1 step (None: 4 × eval_every), got {self.gns_window=}.")
        unknown = sorted(set(self.couple) - {"weight_decay", "beta1", "beta2", "eps"})
        if unknown:
            raise ValueError(f"couple: no batch-size rule for {unknown}, got {self.couple=}.")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be above 1 (or None), got {self.divergence_factor=}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipe_options"] = dict(self.recipe_options)
        d["optimizer_options"] = dict(self.optimizer_options)
        d["couple"] = list(self.couple)
        return d


@dataclass
class TrainResult:
    """How a run ended and what it measured at the end."""

    status: Status
    reason: str = ""
    steps: int = 0
    # final/* metrics (train_loss, val_acc, gen_gap, sharpness, wall_s, ...)
    final: dict[str, float] = field(default_factory=dict)
    # best validation values seen at any eval (for objectives)
    best: dict[str, float] = field(default_factory=dict)
    # what was actually used: device, precision, micro_batch_size, accum_steps, effective lr
    resolved: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where and how often to checkpoint, and what to resume from."""

    path: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    resume_from: Path | None = None

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"every_steps must be at least 1, got {self.every_steps=}.")
        if self.every_seconds is not None and not self.every_seconds > 0:
            raise ValueError(f"every_seconds must be positive, got {self.every_seconds=}.")


class Sink:
    """Where the loop sends what it measures. Implementations buffer; the loop never waits.

    Subclass it and override what you keep: every method has a default, so a sink that only
    wants the evaluations overrides `evaluated` alone. The loop calls `params` once before the
    first step, `metrics`/`series` at logging and evaluation points, `evaluated` after each
    evaluation, and `flush` once when training is over.
    """

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Values measured at `step`."""
        return None

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        """One metric's values at consecutive steps (the per-step losses, once per logging point,
        with `log_every_step`; by default the loop sends each window's row through `metrics`).

        By default one `metrics` call per step; a sink that can take the window at once overrides it.
        """
        for i, value in enumerate(values):
            self.metrics(first_step + i, {key: value})

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        """Called after each evaluation; return False to stop the run (pruning)."""
        return True

    def params(self, values: Mapping[str, Any]) -> None:
        """What the loop resolved (device, precision, micro-batch per process, accumulation steps,
        effective lr, world size), once, before the first step."""
        return None

    def flush(self) -> None:
        """Training is over: called once before the end-of-run measurements (final evaluations,
        sharpness), so that a sink writing elsewhere can do so while they run."""
        return None


class NullSink(Sink):
    """A sink that keeps nothing and never stops the run."""

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        return None  # not even one no-op call per step


class RecordingSink(Sink):
    """Keeps everything in memory: for tests, notebooks and `batchscope train` previews."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.history.setdefault(key, []).append((step, float(value)))

    def series(self, key: str, first_step: int, values: Sequence[float]) -> None:
        self.history.setdefault(key, []).extend((first_step + i, float(v)) for i, v in enumerate(values))

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        self.metrics(step, values)
        return True

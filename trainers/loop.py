"""The training loop: one recipe, one batch size, one learning rate, measured.

Read top to bottom: `train` decides the batch split, precision and learning rate once
(`plan_run`, trainers/plan.py), sets up the data, model and optimizer (`_Run`), runs the
loop, then takes the end-of-run measurements. Each part of a step is a method of `_Run`:
the training step, the logging point, the evaluation point, the end of the run. Inside the loop nothing
reads a value back to the host except at logging and evaluation points, which are marked.

Under torchrun (a process group of W processes, see trainers/distributed.py) the
same loop trains data parallel: every process draws the same global batch and
trains on its own 1/W slice; the gradients are averaged by one all-reduce after
the local backward; losses are averaged at logging points; rank 0 alone reports
to the sink and writes checkpoints, and its decisions to stop reach every process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from batchscope.trainers import distributed, evaluation, optim
from batchscope.trainers.batches import check_step_loss, loss_function, slice_batch
from batchscope.trainers.checkpoint import Checkpointer, CheckpointPolicy, RunState
from batchscope.trainers.checkpoint import load as checkpoint_load
from batchscope.trainers.data import train_batches
from batchscope.trainers.device import Clock, StepTimer, peak_memory_mb
from batchscope.trainers.evaluation import HIGHER_IS_BETTER, crossing, target_reached
from batchscope.trainers.noise_scale_in_loop import Cadence, NoiseScaleWindow, grad_sq_norm
from batchscope.trainers.optim import base_settings
from batchscope.trainers.plan import RunPlan, plan_run
from batchscope.trainers.recipes import build_any_task
from batchscope.trainers.schedule import lr_multiplier
from batchscope.trainers.spec import NullSink, Sink, Status, TrainResult, TrainSpec
from batchscope.trainers.task import DataTask, Task


class Diverged(Exception):
    """The training loss became NaN or infinite, or grew far above its initial value."""


def is_oom_error(exc: BaseException) -> bool:
    """True only for running out of memory (CUDA or CPU allocations), nothing else."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return (
            "out of memory" in msg.lower()
            or "DefaultCPUAllocator: can't allocate memory" in msg
            or "CUDA error: out of memory" in msg
        )
    return False


def make_optimizer(spec: TrainSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """`spec`'s optimizer at learning rate `lr`, its settings without batch-size couplings (the
    memory probes' and benchmarks' optimizer; a run's own comes from its plan)."""
    settings = base_settings(spec.optimizer, spec.momentum, spec.weight_decay, spec.optimizer_options)
    return optim.make_optimizer(spec.optimizer, model, lr, settings)


def train(
    spec: TrainSpec,
    sink: Sink | None = None,
    task: Task | DataTask | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    checkpoint: CheckpointPolicy | None = None,
) -> TrainResult:
    """Train `spec` to its budget (or until stopped) and measure the result.

    Returns a result whose status is `ok`, `pruned` (the sink said stop), `diverged`,
    `oom` or `failed` (`should_stop` returned True, checked at each logging point);
    any other error propagates. `task` may be given to train an already-built model
    and data. With `checkpoint`, the run saves its state at evaluation points when
    due, and resumes from `checkpoint.resume_from` if that file exists.
    """
    # Data parallel: only rank 0 reports; the others train the same model in step with it.
    sink = sink if sink is not None and distributed.is_main() else NullSink()
    wall_start = time.perf_counter()
    plan = plan_run(spec)  # device, precision, batch split, effective lr: decided once
    # Logged from here, before the first step: the one home of these decisions (rank 0's
    # micro-batch is what each process's forward pass sees, which BatchNorm statistics depend on).
    sink.params(dict(plan.resolved))
    run: _Run | None = None
    status: Status = "ok"
    reason = ""
    try:
        run = _Run(spec, plan, sink, task, checkpoint)
        # ---- the loop ----------------------------------------------------
        for step in range(run.state.step + 1, spec.max_steps + 1):
            run.train_step(step)
            at_eval = step % spec.eval_every == 0 or step == spec.max_steps
            if run.n_buffered == spec.log_every or at_eval:
                run.flush(step)  # host sync: logging point (losses, noise-scale measurements)
                if run.agree(should_stop is not None and should_stop()):
                    status, reason = "failed", f"stopped on request at step {step}"
                    break
            if not at_eval:
                continue
            keep_going, at_target = run.evaluation_point(step)  # host sync: evaluation point
            if not keep_going:
                status, reason = "pruned", f"stopped by the sweep's pruner at step {step}"
                break
            if at_target:
                reason = f"stopped at the target {spec.target_metric}={spec.target_value} at step {step}"
                break
    except Diverged as exc:
        assert run is not None  # only a logging point raises it
        return TrainResult("diverged", str(exc), steps=run.state.step, resolved=plan.resolved, best=run.state.best)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        _free(plan.device)
        msg = f"out of memory at batch size {spec.batch_size}: {exc}".splitlines()[0]
        return TrainResult("oom", msg, steps=0, resolved=plan.resolved)
    assert run is not None  # set up, or an exception returned above
    if status == "failed":
        return TrainResult("failed", reason, steps=run.state.step, resolved=plan.resolved, best=run.state.best)
    # Training is over: a sink that writes elsewhere can do so during the measurements below.
    sink.flush()
    return run.finish(status, reason, wall_start)


# ---- the run: set-up, the step, the logging point, the evaluation point, the end -------


class _Run:
    """One training run's objects and bookkeeping, built once; the loop in `train` drives it."""

    def __init__(
        self,
        spec: TrainSpec,
        plan: RunPlan,
        sink: Sink,
        task: Task | DataTask | None,
        checkpoint: CheckpointPolicy | None,
    ) -> None:
        self.spec, self.plan, self.sink = spec, plan, sink
        self.device, self.resolved = plan.device, plan.resolved
        self.task = (
            task if task is not None else build_any_task(spec.recipe, spec.model, spec.recipe_options, plan.device)
        )
        self._build_training(spec, plan)
        self.state = RunState()
        self.saver = Checkpointer(checkpoint) if checkpoint is not None and distributed.is_main() else None
        self.record = self.saver is not None  # keep the history only when it has to go into checkpoints
        if checkpoint is not None and checkpoint.resume_from is not None and checkpoint.resume_from.exists():
            self._resume(checkpoint)
        # Which steps measure the noise scale: fixed, kept from a checkpoint, or chosen from timed steps.
        self.cadence = Cadence(spec.gns_every or self.state.gns_every, spec.gns_budget, self.state.step + 1)
        self.gns_every = self.cadence.every
        if plan.gns_on and self.gns_every is not None:
            self.resolved["gns_every"] = self.state.gns_every = self.gns_every
        self.timer = StepTimer(plan.device)
        self.single_pass = plan.accum_plan == [(0, plan.local_batch)]
        self.target = (
            (spec.target_metric, spec.target_value) if spec.target_metric and spec.target_value is not None else None
        )
        if self.target is not None and self.state.step == 0:
            self._evaluate_at_start(self.target)
        # Per-step losses stay on the device until a logging point; one stack + one copy per flush.
        self.step_losses: list[torch.Tensor] = []
        self.n_buffered, self.first_buffered = 0, self.state.step + 1
        self.time_since, self.last_lr = 0.0, math.nan  # last_lr: the lr last logged
        self.last_val: tuple[int, dict[str, float]] | None = None  # (step, result) of the latest evaluation
        self.model.train()
        self.clock = Clock(plan.device)
        self.t_mark = self.clock.now()

    def _build_training(self, spec: TrainSpec, plan: RunPlan) -> None:
        """Model, optimizer, schedule, batches and the noise-scale window."""
        self.model: nn.Module = self.task.model
        if plan.world > 1:
            distributed.broadcast_module(self.model)  # every process starts from rank 0's weights
        if isinstance(self.task, Task) and self.task.tokens_per_example is not None:
            self.resolved["tokens_per_batch"] = spec.batch_size * self.task.tokens_per_example
        # What a batch counts besides examples (tokens), summed on the device between evaluations.
        self.count = self.task.count if isinstance(self.task, DataTask) else None
        self.counted: torch.Tensor | float = 0.0
        self._unit = self.task.count_unit if isinstance(self.task, DataTask) else "tokens"
        # BatchNorm statistics depend on the micro-batch: reports flag runs where it was not the batch.
        self.resolved["batchnorm"] = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        # torch.compile of a Module is a Module (OptimizedModule), which a recipe's step(model, batch) receives.
        self.step_model = cast(nn.Module, torch.compile(self.model)) if spec.compile else self.model
        self.optimizer = optim.make_optimizer(spec.optimizer, self.model, plan.lr, plan.optimizer_settings)
        self.zero_grad = optim.grad_resetter(self.optimizer)  # optimizer.zero_grad(set_to_none=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(spec.schedule, spec.warmup_steps, spec.max_steps)
        )
        self.scaler = plan.precision.scaler
        self.autocast = plan.precision.autocast
        # A constant lr without warmup needs no scheduler call per step.
        stepping = spec.schedule != "constant" or spec.warmup_steps > 0
        self.advance_lr: Callable[[], None] | None = self._first_lr_step if stepping else None
        if not stepping:
            optim.unwrap_scheduler_step(self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = train_batches(self.task, spec.batch_size, spec.seed, plan.shard, plan.device)
        self.loss_of = loss_function(self.task)  # (model, batch) -> the batch's mean loss
        # The step's forward, backward and optimizer step, decided once for the precision (Precision).
        self.autocast_loss, self.backward = plan.precision.autocast_loss(self.loss_of), plan.precision.backward()
        self.optimizer_step = plan.precision.optimizer_step(self.optimizer)
        gns_window = spec.gns_window or 4 * spec.eval_every
        self.noise = NoiseScaleWindow(gns_window, population=self.task.num_train)
        if plan.gns_on:
            self.resolved["gns_window"] = gns_window
        self.stateful = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "batcher": self.batches,
            "noise": self.noise,
        }

    def _first_lr_step(self) -> None:
        """The scheduler's first step, where torch checks that the optimizer stepped before it; from
        then on the optimizer steps unwrapped (`optim.unwrap_scheduler_step`), the scheduler directly."""
        self.scheduler.step()
        optim.unwrap_scheduler_step(self.optimizer)
        self.optimizer_step = self.plan.precision.optimizer_step(self.optimizer)
        self.advance_lr = self.scheduler.step

    def _resume(self, checkpoint: CheckpointPolicy) -> None:
        assert checkpoint.resume_from is not None
        self.state = checkpoint_load(checkpoint.resume_from, self.stateful, self.device)
        self.resolved["resumed_from_step"] = self.state.step
        # Replay the history so the new run's metrics are complete, without duplicates.
        for s, values in self.state.history:
            self.sink.metrics(s, values)
        if self.saver is not None:
            self.saver.mark(self.state.step)

    def _evaluate_at_start(self, target: tuple[str, float]) -> None:
        """The target metric at initialization: the point the first crossing is interpolated from.

        Logged at step 0 (not an evaluation point: no pruning, no objective), so the stores
        hold every value the crossing was read from.
        """
        start = {f"val/{k}": v for k, v in evaluation.validate(self.task, self.device, self.autocast)[0].items()}
        self.emit(0, start)
        value = start.get(target[0])
        if value is not None and target_reached(target[0], value, target[1]):
            self.state.target_step, self.state.target_time_s, self.state.target_bracket = 0.0, 0.0, [0, 0]
        elif value is not None:
            self.state.target_before = [0, value, 0.0]

    # ---- the step ------------------------------------------------------------------
    def train_step(self, step: int) -> None:
        """One optimizer step on the next batch; the loss stays on the device. No host sync.

        At batch 16 on the CPU every Python call here costs about a microsecond of a ~170 µs step:
        what can be decided once is (`zero_grad`, `autocast_loss`, `backward`, `optimizer_step`, `advance_lr`).
        """
        plan = self.plan
        batch = self.batches.next()  # this process's share of the global batch, on the device
        if self.count is not None:
            self.counted = self.counted + self.count(batch)  # a device tensor stays there: no sync
        measure = probe = False
        if plan.gns_on:
            if self.gns_every is not None:
                measure = step % self.gns_every == 0
            else:
                measure, probe = self.cadence.measures(step), self.cadence.probing(step)
                if probe:
                    self.timer.start()
        self.zero_grad()
        if self.single_pass and not measure:
            # The common case, kept as lean as a hand-written step: one pass over the batch.
            loss = self.autocast_loss(self.step_model, batch)
            if loss.ndim != 0:  # `check_loss`, inline
                check_step_loss(loss, self.spec.recipe)
            self.backward(loss)
            step_loss, small_sq = loss.detach(), None
        else:
            step_loss, small_sq = self._accumulate(batch, plan.gns_plan if measure else plan.accum_plan, measure)
        if plan.world > 1:
            self._average_gradients(small_sq)
        if measure and small_sq is not None:
            self._measure_noise(small_sq, step)
        self.optimizer_step()
        if self.advance_lr is not None:
            self.advance_lr()
        self.step_losses.append(step_loss)
        self.n_buffered += 1
        self.state.step = step
        if probe:
            self._time_probe(step, measure)

    def _accumulate(
        self, batch: Any, micro: list[tuple[int, int]], measure: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward/backward over the micro-batches; the step's loss and, when measuring, the
        small batch's squared gradient norm (device tensors)."""
        local_B, small_at = self.plan.local_batch, self.plan.small_at
        parts: list[torch.Tensor] = []
        small_sq = None
        for j, (lo, hi) in enumerate(micro):
            with self.autocast():
                loss = self.loss_of(self.step_model, slice_batch(batch, lo, hi))
                self.check_loss(loss)
                if hi - lo != local_B:
                    # Mean over the micro-batch, weighted so the sum is this process's batch mean.
                    loss = loss * ((hi - lo) / local_B)
            self.scaler.scale(loss).backward()
            parts.append(loss.detach())
            if measure and j == small_at:
                # The gradient so far is the first `hi` examples' mean times hi/local_B.
                small_sq = grad_sq_norm(self.params) * (local_B / hi) ** 2
        return (parts[0] if len(parts) == 1 else torch.stack(parts).sum()), small_sq

    def check_loss(self, loss: torch.Tensor) -> None:
        """Refuse a loss that is not the batch mean: the micro-batch weights and the noise scale assume it."""
        if loss.ndim != 0:  # shape metadata: no host sync
            check_step_loss(loss, self.spec.recipe)

    def _average_gradients(self, small_sq: torch.Tensor | None) -> None:
        """Data parallel: the global batch's mean gradient on every process, in place.

        The processes' small-batch norms ride in the same collective, so `small_sq`
        becomes their mean: one all-reduce per step, measuring or not.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        distributed.all_reduce_mean(grads if small_sq is None else [*grads, small_sq])

    def _measure_noise(self, small_sq: torch.Tensor, step: int) -> None:
        big_sq = grad_sq_norm(self.params)
        if self.scaler.is_enabled():
            inv = 1.0 / self.scaler._scale.float() ** 2  # type: ignore[union-attr]  # device tensor: no sync
            small_sq, big_sq = small_sq * inv, big_sq * inv
        plan = self.plan
        self.noise.update(small_sq, big_sq, plan.gns_plan[plan.small_at][1], self.spec.batch_size, step)

    def _time_probe(self, step: int, measured: bool) -> None:
        """A timed step of the noise-scale cadence; once all are timed, choose the cadence."""
        self.timer.stop(measured)
        if not self.cadence.due(step):
            return
        for measured_step, seconds in self.timer.results():  # host sync on CUDA, once
            self.cadence.record(measured_step, seconds)
        gns_every = self.cadence.choose()
        if self.plan.world > 1:  # every process measures on the same steps: rank 0's choice
            gns_every = self.cadence.every = distributed.broadcast_int(gns_every, self.device)
        self.gns_every = self.resolved["gns_every"] = self.state.gns_every = gns_every

    # ---- the logging point -----------------------------------------------------------
    def flush(self, upto: int) -> None:
        """Hand the buffered per-step losses to the sink; detect divergence."""
        if self.n_buffered == 0:
            return
        pending = torch.stack(self.step_losses)
        self.step_losses.clear()
        if self.plan.world > 1:
            # One collective per flush: every process sees the global losses and diverges together.
            distributed.all_reduce_mean([pending])
        gns_pending = self.noise.pending()
        if gns_pending:  # the noise-scale measurements since the last flush ride in the same copy
            pending = torch.cat([pending, torch.stack(gns_pending)])
        values = pending.tolist()  # host sync: logging point
        values, gns_values = values[: self.n_buffered], values[self.n_buffered :]
        self._check_divergence(values)  # on every step's loss, whatever reaches the sink
        # The lr where it changed and at evaluations: a constant lr need not cost a row per window.
        lr, spec = float(self.scheduler.get_last_lr()[0]), self.spec
        row = {"lr": lr} if lr != self.last_lr or upto % spec.eval_every == 0 or upto == spec.max_steps else {}
        self.last_lr = lr
        if spec.log_every_step:
            self.emit_losses(self.first_buffered, values)
            if row:
                self.emit(upto, row)
        else:
            self.emit(upto, window_row(values) | row)
        for measured_step, grad_sq, trace in self.noise.receive(gns_values):
            self.emit(measured_step, {"gns/grad_sq": grad_sq, "gns/trace_sigma": trace})
        self.n_buffered, self.first_buffered = 0, upto + 1

    def _check_divergence(self, losses: list[float]) -> None:
        """A NaN/inf loss, or a finite one `divergence_factor` times the first (None: only NaN/inf)."""
        state, limit = self.state, self.spec.divergence_factor
        if state.initial_loss is None:
            state.initial_loss = losses[0]
        for i, v in enumerate(losses):
            if not math.isfinite(v) or (limit is not None and v > limit * state.initial_loss > 0):
                self.n_buffered = 0
                what = f" (over {limit:g}× the initial {state.initial_loss:.4g})" if math.isfinite(v) else ""
                raise Diverged(f"training loss became {v:.4g} at step {self.first_buffered + i}{what}")

    def emit(self, step: int, values: dict[str, float]) -> None:
        self.sink.metrics(step, values)
        if self.record:
            self.state.history.append((step, values))

    def emit_losses(self, first: int, values: list[float]) -> None:
        """Per-step training losses, one call for the whole logging window."""
        self.sink.series("train/loss", first, values)
        if self.record:
            self.state.history.extend((first + i, {"train/loss": v}) for i, v in enumerate(values))

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision on every process, so that all stop together (alone: the flag)."""
        return distributed.broadcast_bool(flag, self.device) if self.plan.world > 1 else flag

    # ---- the evaluation point ----------------------------------------------------------
    def evaluation_point(self, step: int) -> tuple[bool, bool]:
        """Time, validation, noise scale, memory; returns (keep going, target reached and stop)."""
        spec, state = self.spec, self.state
        now = self.clock.now()  # host sync on CUDA: the evaluation point
        state.train_time += now - self.t_mark
        self.time_since += now - self.t_mark
        val, _ = evaluation.validate(self.task, self.device, self.autocast)
        self.last_val = (step, val)
        state.evals = {f"val/{k}": v for k, v in val.items()}
        steps_in_window = step - state.last_eval_step
        measured = dict(state.evals)
        measured["perf/samples_per_s"] = steps_in_window * spec.batch_size / max(self.time_since, 1e-9)
        measured["perf/step_time_ms"] = 1000.0 * self.time_since / max(steps_in_window, 1)
        measured["mem/peak_mb"] = peak_memory_mb(self.device)
        if self.count is not None:
            counted = float(self.counted) * self.plan.world  # host sync: evaluation point
            # Data parallel, each process counts its own slice: the global count, for equal slices.
            measured[f"perf/{self._unit}_per_s"] = counted / max(self.time_since, 1e-9)
            state.counted += counted
            self.counted = 0.0
        measured.update(self.noise.read(step))
        state.last_eval_step = step
        self.time_since = 0.0
        for k, v in state.evals.items():
            better = max if k.endswith(HIGHER_IS_BETTER) else min
            state.best[k] = better(state.best.get(k, v), v)
        self._note_target(step, measured)
        if self.record:
            state.history.append((step, measured))
        keep_going = self.agree(self.sink.evaluated(step, measured))
        # Agreed too: with BatchNorm each process validates with its own running statistics.
        at_target = self.agree(spec.stop_at_target and state.target_step is not None)
        if self.saver is not None and self.saver.due(step):
            self.saver.save(self.stateful, state)
        self.t_mark = self.clock.now()
        return keep_going, at_target

    def _note_target(self, step: int, measured: dict[str, float]) -> None:
        """The crossing of the target, interpolated between this evaluation and the last one short of it."""
        state, target = self.state, self.target
        if target is None or state.target_step is not None or target[0] not in measured:
            return
        point = (step, measured[target[0]], state.train_time)
        if not target_reached(target[0], point[1], target[1]):
            state.target_before = list(point)
            return
        b = state.target_before
        before = (float(b[0]), float(b[1]), float(b[2])) if b is not None else None
        state.target_step, state.target_time_s = crossing(before, point, target[1])
        state.target_bracket = [int(before[0]) if before is not None else 0, step]

    # ---- end-of-run measurements ----------------------------------------------------------
    def finish(self, status: Status, reason: str, wall_start: float) -> TrainResult:
        """Save the final state, measure the trained model and return the run's result."""
        state, target, B = self.state, self.target, self.spec.batch_size
        if self.saver is not None:
            self.saver.save(self.stateful, state)  # the final state: kept checkpoints hold the trained weights
        # The last evaluation was on the final weights unless the loop ended between evaluations
        # (or resumed at its end): no need to run it again.
        last_val = self.last_val
        final_val = last_val[1] if last_val is not None and last_val[0] == state.step else None
        final = evaluation.final_metrics(self.spec, self.task, self.autocast, state.best, self.device, final_val)
        final["final/wall_s"] = time.perf_counter() - wall_start
        final["final/train_time_s"] = state.train_time
        if target is not None and state.target_step is not None:
            # Interpolated between the evaluations around the crossing (`crossing`); the evaluations
            # themselves bracket it: after `_low` steps it was not reached, after `_high` it was.
            final["final/steps_to_target"] = float(state.target_step)
            final["final/samples_to_target"] = float(state.target_step * B)
            final["final/time_to_target_s"] = float(state.target_time_s or 0.0)
            if self.count is not None and state.last_eval_step > 0:
                # At the mean count per step so far (exact for fixed-size batches of tokens).
                final[f"final/{self._unit}_to_target"] = state.target_step * state.counted / state.last_eval_step
            if state.target_bracket is not None:
                final["final/steps_to_target_low"] = float(state.target_bracket[0])
                final["final/steps_to_target_high"] = float(state.target_bracket[1])
        elif target is not None and not reason:
            reason = f"target {target[0]}={target[1]} not reached in {state.step} steps"
        return TrainResult(status, reason, steps=state.step, final=final, best=state.best, resolved=self.resolved)


def window_row(losses: list[float]) -> dict[str, float]:
    """A logging window's per-step losses as one row (logged at its last step): mean, min, max."""
    return {"train/loss": math.fsum(losses) / len(losses), "train/loss_min": min(losses), "train/loss_max": max(losses)}


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

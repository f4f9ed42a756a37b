"""The training loop: one recipe, one batch size, one learning rate, measured.

Read top to bottom: set-up (device, precision, data, model, optimizer), the loop,
then the end-of-run measurements. Device, precision and compilation are decided
before the loop; inside it nothing reads a value back to the host except at
logging and evaluation points, which are marked.

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
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from batchscope.trainers import distributed
from batchscope.trainers.checkpoint import Checkpointer, CheckpointPolicy, RunState
from batchscope.trainers.checkpoint import load as checkpoint_load
from batchscope.trainers.data import DeviceBatcher
from batchscope.trainers.device import (
    Clock,
    StepTimer,
    make_precision,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from batchscope.trainers.gns import Cadence, NoiseScaleWindow, grad_sq_norm
from batchscope.trainers.recipes import build_task
from batchscope.trainers.schedule import lr_multiplier, scaled_lr
from batchscope.trainers.sharpness import top_hessian_eigenvalue
from batchscope.trainers.spec import NullSink, Sink, TrainResult, TrainSpec
from batchscope.trainers.task import Task

AutocastFactory = Callable[[], AbstractContextManager[Any]]

# Metrics where larger is better; a target on any other metric is reached from above.
HIGHER_IS_BETTER = ("acc",)


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


def target_reached(metric: str, value: float, target: float) -> bool:
    if any(metric.endswith(s) for s in HIGHER_IS_BETTER):
        return value >= target
    return value <= target


def crossing(
    before: tuple[float, float, float] | None, after: tuple[float, float, float], target: float
) -> tuple[float, float]:
    """(step, training time) at which a metric first reached `target`, between two evaluations.

    `before` is (step, value, time) of the last evaluation short of the target (None: the target
    was reached at the first one, with nothing to interpolate from), `after` the first at or past
    it. The first evaluation past the target is on average half an evaluation interval late,
    and most so for large batches, which take few steps: read as it is, it flattens steps
    against batch size and biases B_crit low (Shallue et al. 2019 measure at every step). The
    crossing is interpolated linearly between the two.
    """
    step, value, time_s = after
    if before is None:
        return float(step), float(time_s)
    step0, value0, time0 = before
    span = value - value0
    frac = 1.0 if span == 0 else min(1.0, max(0.0, (target - value0) / span))
    return step0 + frac * (step - step0), time0 + frac * (time_s - time0)


def micro_batches(batch_size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) slices covering the batch; the last may be smaller."""
    return [(lo, min(lo + micro_batch_size, batch_size)) for lo in range(0, batch_size, micro_batch_size)]


def make_optimizer(spec: TrainSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if spec.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {spec.optimizer!r}.")
    params = [p for p in model.parameters() if p.requires_grad]

    def build(fused: bool | None) -> torch.optim.Optimizer:
        if spec.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay, fused=fused)
        return torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay, fused=fused)

    # Fused kernels: one kernel per step for all parameters instead of several ops per tensor.
    # On CUDA one launch, and with fp16 the GradScaler hands them its inf check on the device
    # (no per-step host sync); on the CPU (torch >= 2.4) the step of a small model is 2-3.5x
    # faster (MNIST-1D MLP: SGD 118 -> 52 us, AdamW 340 -> 95 us). Devices or dtypes without
    # fused kernels get torch's default implementation.
    if params:
        try:
            return build(fused=True)
        except RuntimeError:
            pass
    return build(fused=None)


@torch.no_grad()
def evaluate(
    task: Task, x: torch.Tensor, y: torch.Tensor, autocast: AutocastFactory, chunk: int = 4096
) -> dict[str, float]:
    """Mean loss (and accuracy) over (x, y) in eval mode. One host sync at the end."""
    model = task.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for lo in range(0, len(x), chunk):
        xb, yb = x[lo : lo + chunk], y[lo : lo + chunk]
        with autocast():
            out = model(xb)
        loss_sum += task.loss_fn(out.float(), yb) * len(xb)
        if task.classification:
            correct += (out.argmax(dim=-1) == yb).sum()
    model.train(was_training)
    # Accuracy is per target element: per example for classifiers, per token for sequence models.
    per_target = max(1, y[:1].numel()) * len(x)
    loss_t, correct_t = torch.stack([loss_sum, correct]).tolist()  # host sync: evaluation point
    result = {"loss": loss_t / len(x)}
    if task.classification:
        result["acc"] = correct_t / per_target
    if task.derived_metrics is not None:
        result.update(task.derived_metrics(result))
    return result


def train(
    spec: TrainSpec,
    sink: Sink | None = None,
    task: Task | None = None,
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

    # ---- set-up: everything decided once ---------------------------------
    device = resolve_device(spec.device)
    precision = make_precision(resolve_precision(spec.precision, device), device)
    seed_everything(spec.seed)
    reset_peak_memory(device)
    B = spec.batch_size
    # Data parallel: every process draws the same global batch of B and trains on its slice.
    W = distributed.world()
    if B % W:
        raise ValueError(f"batch_size must be divisible by the number of processes, got {B=} with {W} processes.")
    local_B = B // W
    shard = slice(distributed.rank() * local_B, (distributed.rank() + 1) * local_B)
    micro = min(spec.micro_batch_size or B, local_B)
    accum_plan = micro_batches(local_B, micro)
    # The noise scale needs gradients at two batch sizes: the mean gradient of the first
    # plan[small_at][1] examples (small) and of the whole batch B (big). Data parallel, the
    # small batch is each process's own slice, measured before the gradients are averaged:
    # no extra cost. Alone, without accumulation, the batch is split in two halves on
    # measuring steps, so such a step costs about the same as a plain one.
    gns_on = spec.gns and B >= 2
    gns_plan, small_at = accum_plan, 0
    if W > 1:
        small_at = len(accum_plan) - 1
    elif len(accum_plan) < 2:
        gns_plan = micro_batches(B, (B + 1) // 2)
    lr = scaled_lr(spec.lr, B, spec.lr_scaling, spec.reference_batch)
    resolved: dict[str, Any] = {
        "device": str(device),
        "precision": precision.name,
        "micro_batch_size": micro,
        "accum_steps": len(accum_plan),
        "effective_lr": lr,
        # What `mem/peak_mb` measures: tensors on a GPU, or the whole process on a CPU.
        "memory_measure": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }
    if W > 1:
        resolved["world_size"] = W
    # Logged from here, before the first step: the one home of these decisions (rank 0's
    # micro-batch is what each process's forward pass sees, which BatchNorm statistics depend on).
    send_params = getattr(sink, "params", None)
    if send_params is not None:
        send_params(dict(resolved))
    state = RunState()
    last_val: tuple[int, dict[str, float]] | None = None  # (step, result) of the latest evaluation
    try:
        if task is None:
            task = build_task(spec.recipe, spec.model, spec.recipe_options, device)
        model: nn.Module = task.model
        if W > 1:
            distributed.broadcast_module(model)  # every process starts from rank 0's weights
        if task.tokens_per_example is not None:
            resolved["tokens_per_batch"] = B * task.tokens_per_example
        # BatchNorm statistics depend on the micro-batch: reports flag runs where it was not the batch.
        resolved["batchnorm"] = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        step_model = torch.compile(model) if spec.compile else model
        optimizer = make_optimizer(spec, model, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(spec.schedule, spec.warmup_steps, spec.max_steps)
        )
        params = [p for p in model.parameters() if p.requires_grad]
        batcher = DeviceBatcher(task.num_train, B, device, seed=spec.seed)
        gns_window = spec.gns_window or 4 * spec.eval_every
        noise = NoiseScaleWindow(gns_window, population=task.num_train)
        if gns_on:
            resolved["gns_window"] = gns_window
        scaler = precision.scaler
        autocast = precision.autocast
        loss_fn = task.loss_fn
        # A constant lr without warmup needs no scheduler call per step.
        advance_lr = scheduler.step if spec.schedule != "constant" or spec.warmup_steps > 0 else _no_op
        # Per-step losses stay on the device until a logging point; one stack + one copy per flush.
        step_losses: list[torch.Tensor] = []
        clock = Clock(device)
        target = (
            (spec.target_metric, spec.target_value) if spec.target_metric and spec.target_value is not None else None
        )
        saver = Checkpointer(checkpoint) if checkpoint is not None and distributed.is_main() else None
        stateful = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "scaler": scaler,
            "batcher": batcher,
            "noise": noise,
        }
        record = saver is not None  # keep the history only when it has to go into checkpoints
        sink_series = getattr(sink, "series", None)

        def emit(step: int, values: dict[str, float]) -> None:
            sink.metrics(step, values)
            if record:
                state.history.append((step, values))

        def emit_losses(first: int, values: list[float]) -> None:
            """Per-step training losses, one call for the whole logging window where the sink can."""
            if sink_series is not None:
                sink_series("train/loss", first, values)
            else:
                for i, v in enumerate(values):
                    sink.metrics(first + i, {"train/loss": v})
            if record:
                state.history.extend((first + i, {"train/loss": v}) for i, v in enumerate(values))

        if checkpoint is not None and checkpoint.resume_from is not None and checkpoint.resume_from.exists():
            state = checkpoint_load(checkpoint.resume_from, stateful, device)
            resolved["resumed_from_step"] = state.step
            # Replay the history so the new run's metrics are complete, without duplicates.
            for s, values in state.history:
                sink.metrics(s, values)
            if saver is not None:
                saver.mark(state.step)

        # Which steps measure the noise scale: fixed, kept from a checkpoint, or chosen from timed steps.
        cadence = Cadence(spec.gns_every or state.gns_every, spec.gns_budget, state.step + 1)
        gns_every = cadence.every
        if gns_on and gns_every is not None:
            resolved["gns_every"] = state.gns_every = gns_every
        timer = StepTimer(device)
        single_pass = accum_plan == [(0, local_B)]

        # A finite loss this many times its first value is a divergence too (None: only NaN/inf).
        limit = spec.divergence_factor
        if target is not None and state.step == 0:
            # The target metric at initialization: the point the first crossing is interpolated from.
            # Logged at step 0 (not an evaluation point: no pruning, no objective), so the stores
            # hold every value the crossing was read from.
            start = {f"val/{k}": v for k, v in evaluate(task, task.val_x, task.val_y, autocast).items()}
            emit(0, start)
            value = start.get(target[0])
            if value is not None and target_reached(target[0], value, target[1]):
                state.target_step, state.target_time_s, state.target_bracket = 0.0, 0.0, [0, 0]
            elif value is not None:
                state.target_before = [0, value, 0.0]
        n_buffered, first_buffered = 0, state.step + 1
        time_since = 0.0
        status, reason = "ok", ""
        model.train()

        def average_gradients(small_sq: torch.Tensor | None) -> None:
            """Data parallel: the global batch's mean gradient on every process, in place.

            The processes' small-batch norms ride in the same collective, so `small_sq`
            becomes their mean: one all-reduce per step, measuring or not.
            """
            grads = [p.grad for p in params if p.grad is not None]
            distributed.all_reduce_mean(grads if small_sq is None else [*grads, small_sq])

        def agree(flag: bool) -> bool:
            """Rank 0's decision on every process, so that all stop together (alone: the flag)."""
            return distributed.broadcast_bool(flag, device) if W > 1 else flag

        def flush(upto: int) -> None:
            """Hand the buffered per-step losses to the sink; detect divergence."""
            nonlocal n_buffered, first_buffered
            if n_buffered == 0:
                return
            pending = torch.stack(step_losses)
            step_losses.clear()
            if W > 1:
                # One collective per flush: every process sees the global losses and diverges together.
                distributed.all_reduce_mean([pending])
            gns_pending = noise.pending()
            if gns_pending:  # the noise-scale measurements since the last flush ride in the same copy
                pending = torch.cat([pending, torch.stack(gns_pending)])
            values = pending.tolist()  # host sync: logging point
            values, gns_values = values[:n_buffered], values[n_buffered:]
            if state.initial_loss is None:
                state.initial_loss = values[0]
            for i, v in enumerate(values):
                if not math.isfinite(v) or (limit is not None and v > limit * state.initial_loss > 0):
                    n_buffered = 0
                    what = f" (over {limit:g}× the initial {state.initial_loss:.4g})" if math.isfinite(v) else ""
                    raise Diverged(f"training loss became {v:.4g} at step {first_buffered + i}{what}")
            emit_losses(first_buffered, values)
            emit(upto, {"lr": float(scheduler.get_last_lr()[0])})
            for measured_step, grad_sq, trace in noise.receive(gns_values):
                emit(measured_step, {"gns/grad_sq": grad_sq, "gns/trace_sigma": trace})
            n_buffered, first_buffered = 0, upto + 1

        t_mark = clock.now()
        # ---- the loop ----------------------------------------------------
        for step in range(state.step + 1, spec.max_steps + 1):
            idx = batcher.next()
            if W > 1:
                idx = idx[shard]
            xb, yb = task.train_x[idx], task.train_y[idx]
            measure = probe = False
            if gns_on:
                if gns_every is not None:
                    measure = step % gns_every == 0
                else:
                    measure, probe = cadence.measures(step), cadence.probing(step)
                    if probe:
                        timer.start()
            plan = gns_plan if measure else accum_plan
            optimizer.zero_grad(set_to_none=True)
            small_sq = None
            if single_pass and not measure:
                # The common case, kept as lean as a hand-written step: one pass over the batch.
                with autocast():
                    loss = loss_fn(step_model(xb).float(), yb)
                scaler.scale(loss).backward()
                step_loss = loss.detach()
            else:
                parts: list[torch.Tensor] = []
                for j, (lo, hi) in enumerate(plan):
                    with autocast():
                        out = step_model(xb[lo:hi])
                        loss = loss_fn(out.float(), yb[lo:hi])
                        if hi - lo != local_B:
                            # Mean over the micro-batch, weighted so the sum is this process's batch mean.
                            loss = loss * ((hi - lo) / local_B)
                    scaler.scale(loss).backward()
                    parts.append(loss.detach())
                    if measure and j == small_at:
                        # The gradient so far is the first `hi` examples' mean times hi/local_B.
                        small_sq = grad_sq_norm(params) * (local_B / hi) ** 2
                step_loss = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
            if W > 1:
                average_gradients(small_sq)
            if measure and small_sq is not None:
                big_sq = grad_sq_norm(params)
                if scaler.is_enabled():
                    inv = 1.0 / scaler._scale.float() ** 2  # type: ignore[union-attr]  # device tensor: no sync
                    small_sq, big_sq = small_sq * inv, big_sq * inv
                noise.update(small_sq, big_sq, plan[small_at][1], B, step)
            scaler.step(optimizer)
            scaler.update()
            advance_lr()
            step_losses.append(step_loss)
            n_buffered += 1
            state.step = step
            if probe:
                timer.stop(measure)
                if cadence.due(step):
                    for measured_step, seconds in timer.results():  # host sync on CUDA, once
                        cadence.record(measured_step, seconds)
                    gns_every = cadence.choose()
                    if W > 1:  # every process measures on the same steps: rank 0's choice
                        gns_every = cadence.every = distributed.broadcast_int(gns_every, device)
                    resolved["gns_every"] = state.gns_every = gns_every

            at_eval = step % spec.eval_every == 0 or step == spec.max_steps
            if n_buffered == spec.log_every or at_eval:
                flush(step)
                if agree(should_stop is not None and should_stop()):
                    status, reason = "failed", f"stopped on request at step {step}"
                    break
            if not at_eval:
                continue

            # ---- evaluation point: time, validation, noise scale, memory -----
            now = clock.now()
            state.train_time += now - t_mark
            time_since += now - t_mark
            val = evaluate(task, task.val_x, task.val_y, autocast)
            last_val = (step, val)
            state.evals = {f"val/{k}": v for k, v in val.items()}
            steps_in_window = step - state.last_eval_step
            measured = dict(state.evals)
            measured["perf/samples_per_s"] = steps_in_window * B / max(time_since, 1e-9)
            measured["perf/step_time_ms"] = 1000.0 * time_since / max(steps_in_window, 1)
            measured["mem/peak_mb"] = peak_memory_mb(device)
            measured.update(noise.read(step))
            state.last_eval_step = step
            time_since = 0.0
            for k, v in state.evals.items():
                better = max if k.endswith(HIGHER_IS_BETTER) else min
                state.best[k] = better(state.best.get(k, v), v)
            if target is not None and state.target_step is None and target[0] in measured:
                point = (step, measured[target[0]], state.train_time)
                if target_reached(target[0], point[1], target[1]):
                    b = state.target_before
                    before = (float(b[0]), float(b[1]), float(b[2])) if b is not None else None
                    state.target_step, state.target_time_s = crossing(before, point, target[1])
                    state.target_bracket = [int(before[0]) if before is not None else 0, step]
                else:
                    state.target_before = list(point)
            if record:
                state.history.append((step, measured))
            keep_going = agree(sink.evaluated(step, measured))
            # Agreed too: with BatchNorm each process validates with its own running statistics.
            at_target = agree(spec.stop_at_target and state.target_step is not None)
            if saver is not None and saver.due(step):
                saver.save(stateful, state)
            t_mark = clock.now()
            if not keep_going:
                status, reason = "pruned", f"stopped by the sweep's pruner at step {step}"
                break
            if at_target:
                reason = f"stopped at the target {spec.target_metric}={spec.target_value} at step {step}"
                break
    except Diverged as exc:
        return TrainResult("diverged", str(exc), steps=state.step, resolved=resolved, best=state.best)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        _free(device)
        return TrainResult("oom", f"out of memory at batch size {B}: {exc}".splitlines()[0], steps=0, resolved=resolved)
    if status == "failed":
        return TrainResult("failed", reason, steps=state.step, resolved=resolved, best=state.best)
    # Training is over: a sink that writes elsewhere can do so during the measurements below.
    sink_flush = getattr(sink, "flush", None)
    if sink_flush is not None:
        sink_flush()
    if saver is not None:
        saver.save(stateful, state)  # the final state: kept checkpoints hold the trained weights

    # ---- end-of-run measurements ----------------------------------------
    # The last evaluation was on the final weights unless the loop ended between evaluations
    # (or resumed at its end): no need to run it again.
    final_val = last_val[1] if last_val is not None and last_val[0] == state.step else None
    final = _final_metrics(spec, task, autocast, state.best, device, final_val)
    final["final/wall_s"] = time.perf_counter() - wall_start
    final["final/train_time_s"] = state.train_time
    if target is not None and state.target_step is not None:
        # Interpolated between the evaluations around the crossing (`crossing`); the evaluations
        # themselves bracket it: after `_low` steps it was not reached, after `_high` it was.
        final["final/steps_to_target"] = float(state.target_step)
        final["final/samples_to_target"] = float(state.target_step * B)
        final["final/time_to_target_s"] = float(state.target_time_s or 0.0)
        if state.target_bracket is not None:
            final["final/steps_to_target_low"] = float(state.target_bracket[0])
            final["final/steps_to_target_high"] = float(state.target_bracket[1])
    elif target is not None and not reason:
        reason = f"target {target[0]}={target[1]} not reached in {state.step} steps"
    return TrainResult(status, reason, steps=state.step, final=final, best=state.best, resolved=resolved)  # type: ignore[arg-type]


def _no_op() -> None:
    return None


def _final_metrics(
    spec: TrainSpec,
    task: Task,
    autocast: AutocastFactory,
    best: dict[str, float],
    device: torch.device,
    val: dict[str, float] | None = None,
) -> dict[str, float]:
    """Training loss/accuracy on a fixed subset the size of the validation set, gap, sharpness.

    `val` is the validation result on the final weights where the loop has it already.
    """
    final: dict[str, float] = {}
    n = min(len(task.val_x), task.num_train)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    subset = torch.randperm(task.num_train, generator=gen)[:n].to(device)
    tr = evaluate(task, task.train_x[subset], task.train_y[subset], autocast)
    if val is None:
        val = evaluate(task, task.val_x, task.val_y, autocast)
    final["final/train_loss"] = tr["loss"]
    final["final/val_loss"] = val["loss"]
    final["final/gen_gap"] = val["loss"] - tr["loss"]
    if task.classification:
        final["final/train_acc"] = tr["acc"]
        final["final/val_acc"] = val["acc"]
        final["final/gen_gap_acc"] = tr["acc"] - val["acc"]
    for key in val.keys() - {"loss", "acc"}:  # recipe-derived metrics, e.g. perplexity
        final[f"final/val_{key}"] = val[key]
        final[f"final/train_{key}"] = tr[key]
    if "val/acc" in best:
        final["final/best_val_acc"] = best["val/acc"]
    if "val/loss" in best:
        final["final/best_val_loss"] = best["val/loss"]
    if spec.sharpness:
        m = min(512, n)
        sharp = top_hessian_eigenvalue(
            task.model,
            task.loss_fn,
            task.train_x[subset[:m]],
            task.train_y[subset[:m]],
            max_iters=spec.sharpness_iters,
            tol=spec.sharpness_tol,
            seed=spec.seed,
        )
        final["final/sharpness"] = sharp.value
        final["final/sharpness_iters"] = float(sharp.iterations)
    return final


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

"""Inference throughput and latency of a recipe's model across batch sizes.

Each batch size is timed on its own: warm-up calls first (not timed: allocator,
kernel selection, lazy initialization), then `iters` timed forward passes in eval
mode under `torch.inference_mode` and the precision's autocast. The inputs are real
validation examples (repeated when the batch is larger than the validation set),
already on the device: what is timed is the model, not data loading.

A forward pass is `model(x)` for a `Task`. For a `DataTask` (data that streams) it is what
the recipe trains with, less the backward pass: its `step(model, batch)` where it gives one,
else `model(**batch)` for a dict batch and `model(x)` for an `(x, y)` batch; the batch is
drawn from its validation data (a tensor, tuple or dict batch), gathered on the device first.

On CUDA each call is timed with a pair of CUDA events and the host waits only once
per batch size, after the timed calls, so the timing does not include host
round-trips. On CPU each call is timed with `time.perf_counter`.

A batch size that runs out of memory is reported with status `oom`; the others are
still measured.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from batchscope.trainers.batches import batch_size_of, cat_batches, take_rows
from batchscope.trainers.data import val_batches
from batchscope.trainers.device import make_precision, resolve_device, resolve_precision, seed_everything
from batchscope.trainers.loop import is_oom_error
from batchscope.trainers.memory_probe import preserved_rng
from batchscope.trainers.recipes import build_any_task
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import DataTask, Task

__all__ = ["InferenceResult", "inference_table", "load_weights", "measure_inference"]


@dataclass(frozen=True)
class InferenceResult:
    """Throughput and per-call latency of the model at one batch size."""

    batch_size: int
    status: Literal["ok", "oom"]
    samples_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_mean_ms: float
    iters: int
    device: str
    precision: str
    detail: str = ""


def load_weights(model: nn.Module, path: str | os.PathLike[str], device: torch.device) -> None:
    """Load a state_dict saved with torch.save: the model's own, or a batchscope checkpoint's."""
    state: Any = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("objects"), dict) and "model" in state["objects"]:
        state = state["objects"]["model"]  # a training checkpoint (trainers.checkpoint)
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model.load_state_dict(state)


def measure_inference(
    source: TrainSpec | Task | DataTask,
    batch_sizes: Sequence[int],
    *,
    warmup: int = 5,
    iters: int = 30,
    device: str | torch.device | None = None,
    precision: str | None = None,
    weights: str | os.PathLike[str] | None = None,
) -> list[InferenceResult]:
    """Samples/s and p50/p95 latency (ms per forward pass) at each batch size.

    Args:
        source: a spec (its recipe's model is built here, on `device` or `spec.device`,
            and `weights` may be loaded into it) or a task of either form (`Task`, or a
            `DataTask` whose data streams) whose model is used as it is (on its own device;
            its train/eval mode is restored afterwards).
        batch_sizes: measured in this order.
        warmup: untimed calls per batch size before the timed ones.
        iters: timed calls per batch size.
        precision: `auto`, `fp32`, `bf16` or `fp16`; defaults to the spec's (`auto` for a task).
        weights: a state_dict file (torch.save), loaded with `weights_only=True`.
    """
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty.")
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"every batch size must be at least 1, got {b} in {list(batch_sizes)}.")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup=}.")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters=}.")

    if isinstance(source, TrainSpec):
        dev = resolve_device(str(device) if device is not None else source.device)
        with preserved_rng(dev):  # seeded like a training run, without moving the caller's streams
            seed_everything(source.seed)
            task = build_any_task(source.recipe, source.model, source.recipe_options, dev)
        if weights is not None:
            load_weights(task.model, weights, dev)
        precision_name = resolve_precision(precision or source.precision, dev)
    else:
        task = source
        if weights is not None:
            raise ValueError("weights can only be loaded into a model built from a spec, not into a given task.")
        dev = _model_device(task.model)
        if device is not None and resolve_device(str(device)) != dev:
            raise ValueError(f"the task's model is on {dev}, not on {device}; move it or pass a spec.")
        precision_name = resolve_precision(precision or "auto", dev)
    autocast = make_precision(precision_name, dev).autocast

    model = task.model
    was_training = model.training
    model.eval()
    results = []
    try:
        with torch.inference_mode():  # the validation examples, gathered once for every batch size
            forward = _tensor_forward(model, task.val_x, dev) if isinstance(task, Task) else _data_forward(task, dev)
        for b in batch_sizes:
            results.append(_measure_one(forward, b, dev, precision_name, autocast, warmup, iters))
    finally:
        model.train(was_training)
    return results


# A forward pass at a batch size: `prepare(batch_size)` puts the inputs on the device (untimed)
# and returns the call that is timed.
Prepare = Callable[[int], Callable[[], Any]]


def _tensor_forward(model: nn.Module, examples: torch.Tensor, device: torch.device) -> Prepare:
    def prepare(batch_size: int) -> Callable[[], Any]:
        idx = torch.arange(batch_size, device=examples.device) % len(examples)
        x = examples[idx].to(device)
        return lambda: model(x)

    return prepare


def _data_forward(task: DataTask, device: torch.device) -> Prepare:
    """Batches of a DataTask's validation examples (repeated past its end), and its forward pass."""
    pool = _validation_pool(task, device)
    n = batch_size_of(pool)
    model, step = task.model, task.step

    def prepare(batch_size: int) -> Callable[[], Any]:
        batch = take_rows(pool, torch.arange(batch_size) % n)
        if step is not None:
            return lambda: step(model, batch)
        if isinstance(batch, Mapping):
            return lambda: model(**batch)
        if isinstance(batch, torch.Tensor):
            return lambda: model(batch)
        return lambda: model(batch[0])  # (x, y): the inputs alone

    return prepare


# Validation examples kept for the inputs: enough for batches of this many distinct examples.
_POOL = 4096


def _validation_pool(task: DataTask, device: torch.device) -> Any:
    batches, have = [], 0
    for batch in val_batches(task, device):
        batches.append(batch)
        have += batch_size_of(batch)
        if have >= _POOL:
            break
    if not batches:
        raise ValueError("the validation data gave no batch; throughput needs at least one example.")
    return cat_batches(batches)


def _measure_one(
    prepare: Prepare,
    batch_size: int,
    device: torch.device,
    precision: str,
    autocast: Any,
    warmup: int,
    iters: int,
) -> InferenceResult:
    latencies_ms: list[float] | None = None
    detail = ""
    try:
        latencies_ms = _time_calls(prepare, batch_size, device, autocast, warmup, iters)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    if latencies_ms is None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        nan = math.nan
        return InferenceResult(batch_size, "oom", nan, nan, nan, nan, 0, str(device), precision, detail)
    lat = np.asarray(latencies_ms)
    mean = float(lat.mean())
    return InferenceResult(
        batch_size=batch_size,
        status="ok",
        samples_per_s=batch_size / (mean / 1000.0) if mean > 0 else math.inf,
        latency_p50_ms=float(np.percentile(lat, 50)),
        latency_p95_ms=float(np.percentile(lat, 95)),
        latency_mean_ms=mean,
        iters=iters,
        device=str(device),
        precision=precision,
    )


def _time_calls(
    prepare: Prepare,
    batch_size: int,
    device: torch.device,
    autocast: Any,
    warmup: int,
    iters: int,
) -> list[float]:
    """Milliseconds per forward pass, `iters` of them, after `warmup` untimed ones."""
    cuda = device.type == "cuda"
    with torch.inference_mode(), autocast():
        forward = prepare(batch_size)
        for _ in range(warmup):
            forward()
        if cuda:
            torch.cuda.synchronize(device)  # sync point: warm-up work must not leak into the timings
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for start, end in zip(starts, ends, strict=True):
                start.record()
                forward()
                end.record()
            torch.cuda.synchronize(device)  # sync point: once per batch size, after the timed calls
            return [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]
        latencies = []
        for _ in range(iters):
            t0 = time.perf_counter()
            forward()
            latencies.append((time.perf_counter() - t0) * 1000.0)
        return latencies


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def inference_table(results: Sequence[InferenceResult]) -> str:
    """The results as a plain-text table."""
    lines = [f"{'batch':>7}  {'samples/s':>12}  {'p50 ms':>9}  {'p95 ms':>9}  status"]
    for r in results:
        if r.status == "ok":
            lines.append(
                f"{r.batch_size:>7}  {r.samples_per_s:>12.1f}  {r.latency_p50_ms:>9.3f}  {r.latency_p95_ms:>9.3f}  ok"
            )
        else:
            lines.append(f"{r.batch_size:>7}  {'-':>12}  {'-':>9}  {'-':>9}  {r.status}  {r.detail}")
    return "\n".join(lines)

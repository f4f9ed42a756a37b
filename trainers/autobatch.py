"""AutoBatch: the largest batch size whose training step fits in memory, measured and verified.

Ultralytics' `batch=-1` profiles a few small batches, fits a line, extrapolates to
60% of free memory and falls back to 16 on CPU without saying so; its users report
OOMs from the extrapolation and picks far below what fits. Here every number is a
measurement of real training steps (forward, backward, optimizer step, with the
spec's precision, autocast and GradScaler):

1. Grow: probe `min_batch`, then larger batches (×8 while a probe uses under 1/16 of
   the headroom, ×4 under 1/8, else ×2: on a linear memory curve a jump of ×4 or ×8
   lands under half the headroom) until one does not fit or the cap is reached.
2. Fit peak memory = intercept + slope·batch by least squares over every probe that
   ran to the end, and predict the largest batch under the budget.
3. Verify by running that batch. If it fits and the refitted line predicts nothing
   larger, it is the answer; if it does not fit, bisect between the largest batch that
   fitted and the smallest that did not, to within 1/32.

Batches of 64 and more are kept to multiples of 8 (the growth sizes are powers of two
times `min_batch`); a cap (`max_batch`, or the training set) is used exactly.

Where the memory is measured:

- CUDA: in this process, `torch.cuda.max_memory_allocated` after a reset, against
  `fraction` × (free device memory + what this process's allocator already holds).
  Only out-of-memory errors are caught; memory is released after each probe.
- CPU: each probe runs in its own child process, so its peak resident memory (VmHWM)
  is its own: a helper process started with `python -m batchscope.trainers.autobatch --serve`
  imports torch once and forks one child per probe (a fresh interpreter per probe
  costs seconds of imports on a small machine). The child sets an address-space limit
  (RLIMIT_AS) at the budget's headroom, plus slack for glibc's per-thread arenas,
  before the measured steps, so a batch far too big fails to allocate instead of
  swapping; such a failure counts as out of memory. The budget is `fraction` × MemAvailable
  (read before any probe), and it bounds the peak resident memory of the whole
  training process (interpreter, torch, data, model, optimizer state, the step).

The probe processes run with glibc's mmap threshold fixed at 128 KiB
(`MALLOC_MMAP_THRESHOLD_`, unless already set): with the default dynamic threshold,
freed buffers of up to 32 MB stay in the heap, and the peak of the very same step was
measured at 474 to 631 MB in different processes (MNIST-1D MLP, batch 65536), which
no search can work with. With the fixed threshold the peak is linear in the batch and
repeats to within 1 MB. A training process with the default allocator may retain more
than measured while its tensors are under 32 MB each, that is at small batches; once
tensors are larger, as near any budget of gigabytes, glibc maps them directly either way.

What is probed is one forward/backward pass over the whole batch: the largest
`micro_batch_size` when training with gradient accumulation. The probe trains eagerly
(`compile` is ignored) and does not include evaluation, which runs in chunks of 4096
without gradients. The caller's objects are never touched: probes build their own
task, model and optimizer and discard them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import importlib
import json
import math
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import torch

from batchscope.trainers.data import DeviceBatcher
from batchscope.trainers.device import (
    Precision,
    make_precision,
    peak_memory_mb,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from batchscope.trainers.loop import is_oom_error, make_optimizer
from batchscope.trainers.recipes import build_task
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import Task

__all__ = [
    "AutoBatchError",
    "AutoBatchResult",
    "LinearFit",
    "MemoryProber",
    "Probe",
    "find_batch_size",
    "fit_line",
    "mem_available_mb",
    "memory_budget_mb",
    "preserved_rng",
    "probe_table",
    "search_batch_size",
]

ProbeStatus = Literal["ok", "over_budget", "oom"]

# Stop bisecting when the bracket is this small relative to the batch that fits.
_REL_TOL = 1 / 32
# Extra address space allowed above the budget's headroom in a CPU probe: allocations
# are counted in address space before they are touched, and each thread that allocates
# makes glibc reserve a 64 MB arena (16 threads on a 16-core machine: 1 GB reserved,
# almost none of it resident). The measured resident peak, not this limit, decides
# whether a probe fits; the limit only stops a far too big probe before it swaps.
_AS_SLACK_MB = 64.0
_AS_SLACK_FRACTION = 0.05
_AS_SLACK_PER_THREAD_MB = 64.0
_MAX_PROBES = 40
# Probe steps: enough for the GradScaler to take one optimizer step (fp16 may skip a few).
_MAX_SCALER_SKIPS = 8


class AutoBatchError(Exception):
    """No batch size fits, or a probe failed for a reason other than memory.

    Deliberately not a RuntimeError, so that it can never be mistaken for an
    out-of-memory error by `batchscope.trainers.loop.is_oom_error`.
    """

    def __init__(self, message: str, probes: Sequence[Probe] = ()) -> None:
        super().__init__(message)
        self.probes = tuple(probes)


@dataclass(frozen=True)
class Probe:
    """One measured attempt at a batch size.

    `status`: `ok` (ran and its peak is within the budget), `over_budget` (ran, but its
    peak is above the budget) or `oom` (an allocation failed; `peak_mb` is then None).
    `baseline_mb` is the memory in use just before the measured steps (CPU: resident
    memory of the probe process; CUDA: allocated by this process).
    """

    batch_size: int
    status: ProbeStatus
    peak_mb: float | None
    baseline_mb: float | None = None
    detail: str = ""

    @property
    def fits(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class LinearFit:
    """peak_mb ≈ intercept_mb + mb_per_example · batch_size, by least squares."""

    intercept_mb: float
    mb_per_example: float
    n_points: int

    def peak_at(self, batch_size: int) -> float:
        return self.intercept_mb + self.mb_per_example * batch_size

    def largest_under(self, budget_mb: float) -> float:
        """The (real-valued) batch at which the line reaches the budget; inf if it never does."""
        if self.mb_per_example <= 0:
            return math.inf
        return (budget_mb - self.intercept_mb) / self.mb_per_example


@dataclass(frozen=True)
class AutoBatchResult:
    """The chosen batch size and everything measured to choose it."""

    batch_size: int
    probes: tuple[Probe, ...]
    intercept_mb: float
    mb_per_example: float
    budget_mb: float
    budget_source: str
    predicted_peak_mb: float
    verified_peak_mb: float
    device: str
    precision: str
    method: str
    num_train: int | None = None
    capped_by: str | None = None

    def table(self) -> str:
        """The probes as a plain-text table, in the order they ran."""
        return probe_table(self.probes, self.budget_mb)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "budget_mb": self.budget_mb,
            "budget_source": self.budget_source,
            "intercept_mb": self.intercept_mb,
            "mb_per_example": self.mb_per_example,
            "predicted_peak_mb": self.predicted_peak_mb,
            "verified_peak_mb": self.verified_peak_mb,
            "device": self.device,
            "precision": self.precision,
            "method": self.method,
            "num_train": self.num_train,
            "capped_by": self.capped_by,
            "probes": [
                {"batch_size": p.batch_size, "status": p.status, "peak_mb": p.peak_mb, "detail": p.detail}
                for p in self.probes
            ],
        }


def probe_table(probes: Sequence[Probe], budget_mb: float) -> str:
    lines = [f"{'batch':>9}  {'peak MB':>10}  status  (budget {budget_mb:.1f} MB)"]
    for p in probes:
        peak = f"{p.peak_mb:10.1f}" if p.peak_mb is not None else f"{'-':>10}"
        note = f"  {p.detail}" if p.detail and not p.fits else ""
        lines.append(f"{p.batch_size:>9}  {peak}  {p.status}{note}")
    return "\n".join(lines)


# ---- the budget -------------------------------------------------------------------


def mem_available_mb() -> float:
    """MemAvailable from /proc/meminfo: what new allocations can get without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise OSError("/proc/meminfo has no MemAvailable line; pass budget_mb.")


def memory_budget_mb(device: torch.device, fraction: float, budget_mb: float | None = None) -> tuple[float, str]:
    """The peak-memory budget for a training process on `device`, and how it was set."""
    if budget_mb is not None:
        if not budget_mb > 0:
            raise ValueError(f"budget_mb must be positive, got {budget_mb=}.")
        return float(budget_mb), f"budget_mb={budget_mb:g}"
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction=}.")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)  # this process's cache is usable too
        capacity = (free + held) / 2**20
        return fraction * capacity, f"{fraction:g} × {capacity:.0f} MB free on {device}"
    available = mem_available_mb()
    return fraction * available, f"{fraction:g} × {available:.0f} MB MemAvailable"


# ---- real training steps ----------------------------------------------------------


class _StepRunner:
    """Training steps as the loop takes them, with a fresh optimizer, on a task it owns."""

    def __init__(self, spec: TrainSpec, task: Task, device: torch.device, precision: Precision) -> None:
        self.spec = spec
        self.task = task
        self.device = device
        self.precision = precision
        self.optimizer = make_optimizer(spec, task.model, spec.lr)
        self.steps_taken = 0

    def run(self, batch_size: int, steps: int = 2) -> None:
        """`steps` steps at `batch_size`, and more while the GradScaler has skipped every step so far."""
        task, scaler = self.task, self.precision.scaler
        task.model.train()
        batcher = DeviceBatcher(task.num_train, batch_size, self.device, seed=self.spec.seed)
        for i in range(steps + _MAX_SCALER_SKIPS):
            if i >= steps and self.steps_taken > 0:
                break
            idx = batcher.next()
            xb, yb = task.train_x[idx], task.train_y[idx]
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                loss = task.loss_fn(task.model(xb).float(), yb)
            scaler.scale(loss).backward()
            before = scaler.get_scale() if scaler.is_enabled() else 0.0  # host sync: probes only
            scaler.step(self.optimizer)
            scaler.update()
            # A skipped step (inf/NaN gradients) lowers the scale; otherwise it stays or grows.
            if not scaler.is_enabled() or scaler.get_scale() >= before:
                self.steps_taken += 1
        del xb, yb, loss


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore the global random states (Python, NumPy, torch CPU and `device`) on exit."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _build(spec: TrainSpec, device: torch.device) -> tuple[Task, Precision]:
    seed_everything(spec.seed)
    precision = make_precision(resolve_precision(spec.precision, device), device)
    task = build_task(spec.recipe, spec.model, spec.recipe_options, device)
    return task, precision


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---- the probers ------------------------------------------------------------------


class MemoryProber:
    """Measures the peak memory of real training steps of `spec` at given batch sizes.

    A context manager: on CPU it starts (and stops) the helper process that forks one
    child per probe; on CUDA it builds the task once and probes in this process. One
    prober can serve several searches on the same spec (`find_batch_size(prober=...)`).
    A probe fits when its peak is within the budget (`budget_mb` here, or per probe);
    on CPU the budget also sets the probe's address-space limit (none when infinite).

        with MemoryProber(spec, budget_mb=2000) as prober:
            probe = prober.probe(256)
    """

    def __init__(
        self,
        spec: TrainSpec,
        *,
        budget_mb: float = math.inf,
        device: str | torch.device | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        _check_budget(budget_mb)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s=}.")
        self.spec = spec
        self.device = resolve_device(str(device) if device is not None else spec.device)
        self.precision = resolve_precision(spec.precision, self.device)
        self.budget_mb = float(budget_mb)
        self.timeout_s = timeout_s
        self.num_train: int | None = None
        self._server: _ProbeServer | None = None
        self._task: Task | None = None
        self._precision: Precision | None = None

    def __enter__(self) -> MemoryProber:
        if self.device.type == "cpu":
            self._server = _ProbeServer(self.timeout_s)
            try:
                self._prime()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(kill=exc_type is not None)

    def close(self, *, kill: bool = False) -> None:
        """Stop the helper process (at once with `kill`, e.g. on Ctrl-C) and free the probes' task."""
        if self._server is not None:
            self._server.close(kill=kill)
            self._server = None
        if self._task is not None:
            self._task = None
            self._precision = None
            _release(self.device)

    def probe(self, batch_size: int, *, budget_mb: float | None = None) -> Probe:
        """Train at `batch_size` and measure; `budget_mb` overrides the prober's budget."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size=}.")
        budget = self.budget_mb if budget_mb is None else _check_budget(budget_mb)
        if self.device.type == "cpu":
            return self._probe_in_child(batch_size, budget)
        return self._probe_here(batch_size, budget)

    @staticmethod
    def _classify(batch_size: int, peak: float, baseline: float | None, budget: float) -> Probe:
        status: ProbeStatus = "ok" if peak <= budget else "over_budget"
        detail = "" if status == "ok" else f"peak {peak:.1f} MB > budget {budget:.1f} MB"
        return Probe(batch_size, status, peak, baseline, detail)

    # ---- CPU: one forked child per probe ----
    def _prime(self) -> None:
        """A first child that builds the task and takes a step without measuring anything.

        The helper then imports what it imported, so that every measured child starts
        from the same process (otherwise the first probe's baseline is tens of MB higher).
        """
        assert self._server is not None
        reply = self._server.request({"spec": replace(self.spec, device="cpu"), "batch_size": None, "budget_mb": 0})
        if reply.get("status") != "primed":
            raise AutoBatchError(f"the probe process could not build the task:\n{reply.get('detail', '')}".rstrip())
        self.num_train = int(reply["num_train"])

    def _probe_in_child(self, batch_size: int, budget: float) -> Probe:
        if self._server is None:
            raise RuntimeError("MemoryProber must be used as a context manager (with ... as prober).")
        request = {"spec": replace(self.spec, device="cpu"), "batch_size": batch_size, "budget_mb": budget}
        reply = self._server.request(request)
        if self.num_train is None and reply.get("num_train") is not None:
            self.num_train = int(reply["num_train"])
        status = reply.get("status")
        if status == "ok":
            return self._classify(batch_size, float(reply["peak_mb"]), reply.get("baseline_mb"), budget)
        if status == "oom":
            return Probe(batch_size, "oom", None, reply.get("baseline_mb"), str(reply.get("detail", "")))
        raise AutoBatchError(
            f"the memory probe at batch size {batch_size} failed with an error that is not out of memory:\n"
            f"{reply.get('detail', '')}".rstrip()
        )

    # ---- CUDA: in this process ----
    def _probe_here(self, batch_size: int, budget: float) -> Probe:
        with preserved_rng(self.device):  # the caller's random streams are not ours to move
            return self._probe_here_unseeded(batch_size, budget)

    def _probe_here_unseeded(self, batch_size: int, budget: float) -> Probe:
        if self._task is None:
            self._task, self._precision = _build(self.spec, self.device)
            self.num_train = self._task.num_train
        assert self._precision is not None
        runner: _StepRunner | None = None
        baseline: float | None = None
        peak: float | None = None
        detail = ""
        try:
            runner = _StepRunner(self.spec, self._task, self.device, self._precision)
            runner.run(min(2, batch_size))  # optimizer state, cuBLAS workspaces: part of every step
            torch.cuda.synchronize(self.device)
            baseline = torch.cuda.memory_allocated(self.device) / 2**20
            reset_peak_memory(self.device)
            runner.run(batch_size)
            torch.cuda.synchronize(self.device)  # host sync: the measurement point
            peak = peak_memory_mb(self.device)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            detail = _first_line(exc)
        finally:
            # The probe's optimizer state and gradients go; the task stays for the next probe.
            del runner
            for p in self._task.model.parameters():
                p.grad = None
            _release(self.device)
        if peak is None:
            return Probe(batch_size, "oom", None, baseline, detail)
        return self._classify(batch_size, peak, baseline, budget)


def _check_budget(budget_mb: float) -> float:
    if not budget_mb > 0:
        raise ValueError(f"budget_mb must be positive, got {budget_mb=}.")
    return float(budget_mb)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the search -------------------------------------------------------------------


def _round(batch_size: float) -> int:
    b = int(batch_size)
    return b - b % 8 if b >= 64 else b


def _tolerance(lo: int) -> int:
    return max(8 if lo >= 64 else 1, int(lo * _REL_TOL))


def fit_line(probes: Sequence[Probe]) -> LinearFit | None:
    """Least squares of peak vs batch over the probes that ran to the end (None: under two sizes)."""
    points = [(p.batch_size, p.peak_mb) for p in probes if p.peak_mb is not None]
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    sxx = sum((b - mean_b) ** 2 for b, _ in points)
    sxy = sum((b - mean_b) * (m - mean_m) for b, m in points)
    slope = sxy / sxx
    return LinearFit(intercept_mb=mean_m - slope * mean_b, mb_per_example=slope, n_points=n)


def _inside(candidate: float, lo: int, hi: int) -> int | None:
    """`candidate` rounded into the open bracket (lo, hi), or None when nothing lies between."""
    if hi - lo < 2:
        return None
    c = _round(min(max(candidate, lo + 1), hi - 1))
    if c <= lo:
        c = lo + 1
    return c if lo < c < hi else None


def search_batch_size(
    probe: Callable[[int], Probe], *, budget_mb: float, min_batch: int, cap: Callable[[], int]
) -> tuple[int, list[Probe], str]:
    """Grow, fit, verify, bisect (see the module docstring). Returns (answer, probes, how)."""
    probes: list[Probe] = []

    def run(b: int) -> Probe:
        p = probe(b)
        probes.append(p)
        return p

    first = run(min_batch)
    if not first.fits:
        raise AutoBatchError(_nothing_fits(first, budget_mb), probes)
    limit = cap()
    lo, hi = min_batch, None
    while lo < limit:
        base = first.peak_mb or 0.0
        head = budget_mb - base
        last = probes[-1].peak_mb or base
        used = (last - base) / head if head > 0 else 1.0
        factor = 8 if used < 1 / 16 else 4 if used < 1 / 8 else 2
        b = min(limit, lo * factor)
        if run(b).fits:
            lo = b
        else:
            hi = b
            break
    if hi is None:
        return lo, probes, f"the cap {lo} fits"

    # Fit and verify; once a fitted prediction fails, bisect.
    how = "fit"
    while hi - lo > _tolerance(lo) and len(probes) < _MAX_PROBES:
        fit = fit_line(probes)
        if fit is None:
            how = "bisection"
        if how == "fit" and fit is not None:
            candidate = _inside(fit.largest_under(budget_mb), lo, hi)
        else:
            candidate = _inside((lo + hi) / 2, lo, hi)
        if candidate is None:
            break
        if run(candidate).fits:
            lo = candidate
            refit = fit_line(probes)
            if how == "fit" and (refit is None or refit.largest_under(budget_mb) < lo + _tolerance(lo)):
                return lo, probes, "fit, verified"
        else:
            hi = candidate
            how = "bisection"
    return lo, probes, "fit, verified" if how == "fit" else f"bisection to within {_tolerance(lo)}"


def _nothing_fits(first: Probe, budget_mb: float) -> str:
    what = f"allocation failed ({first.detail})" if first.status == "oom" else f"peak {first.peak_mb:.1f} MB"
    base = f"; {first.baseline_mb:.1f} MB were in use before the step" if first.baseline_mb is not None else ""
    return (
        f"no batch size fits: the smallest probe, batch size {first.batch_size}, measured {what} "
        f"against a budget of {budget_mb:.1f} MB{base}."
    )


def find_batch_size(
    spec: TrainSpec,
    *,
    fraction: float = 0.9,
    budget_mb: float | None = None,
    max_batch: int = 65536,
    min_batch: int = 1,
    cap_at_dataset: bool = True,
    device: str | torch.device | None = None,
    probe_timeout_s: float = 600.0,
    prober: MemoryProber | None = None,
) -> AutoBatchResult:
    """The largest batch size whose training step on `spec` fits in memory, measured and verified.

    Args:
        spec: recipe, model, optimizer, precision and device to probe (batch size,
            micro-batch size and compile are ignored: one eager forward pass per step).
        fraction: share of free memory the training process may peak at (CUDA: free
            device memory; CPU: MemAvailable). Ignored when `budget_mb` is given.
        budget_mb: the peak-memory budget in MB, overriding `fraction`.
        max_batch, min_batch: the range searched; `min_batch` is the first probe.
        cap_at_dataset: do not search past the number of training examples (a larger
            batch repeats examples within a step).
        device: overrides `spec.device`.
        probe_timeout_s: a CPU probe taking longer than this is an error.
        prober: an open `MemoryProber` for the same spec and device, to reuse (its helper
            process on CPU) across several searches; by default one is opened and closed here.

    Raises:
        AutoBatchError: `min_batch` does not fit (the message says what was measured),
            or a probe failed for a reason other than memory.
    """
    if min_batch < 1:
        raise ValueError(f"min_batch must be at least 1, got {min_batch=}.")
    if max_batch < min_batch:
        raise ValueError(f"max_batch must be at least min_batch, got {max_batch=} and {min_batch=}.")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction=}.")
    dev = resolve_device(str(device) if device is not None else spec.device)
    if prober is not None and (prober.spec != spec or prober.device != dev):
        raise ValueError(
            f"the prober given measures {prober.spec.recipe}/{prober.spec.model} on {prober.device}; "
            f"it must have been opened with the same spec and device ({dev})."
        )
    budget, source = memory_budget_mb(dev, fraction, budget_mb)
    opened = MemoryProber(spec, budget_mb=budget, device=dev, timeout_s=probe_timeout_s) if prober is None else None
    with opened or contextlib.nullcontext(prober) as active:
        assert active is not None

        def cap() -> int:
            if cap_at_dataset and active.num_train is not None:
                return max(min_batch, min(max_batch, active.num_train))
            return max_batch

        answer, probes, how = search_batch_size(
            functools.partial(active.probe, budget_mb=budget), budget_mb=budget, min_batch=min_batch, cap=cap
        )
        num_train = active.num_train
        precision = active.precision
    fit = fit_line(probes) or LinearFit(probes[0].peak_mb or 0.0, 0.0, 1)
    at_answer = [p for p in probes if p.batch_size == answer and p.fits]
    verified = at_answer[-1].peak_mb if at_answer else None
    assert verified is not None  # the answer is always a probe that fitted
    capped_by = None
    if answer == cap() and not any(p.batch_size > answer for p in probes):
        capped_by = "dataset" if cap_at_dataset and num_train is not None and answer == num_train else "max_batch"
    where = "in forked child processes" if dev.type == "cpu" else "in this process"
    failed = sorted((p for p in probes if not p.fits), key=lambda p: p.batch_size)
    parts = [
        f"{len(probes)} probes of real training steps {where} ({spec.optimizer}, {precision}, {dev})",
        f"linear fit {fit.intercept_mb:.1f} MB + {fit.mb_per_example * 1024:.2f} KB/example",
    ]
    if capped_by == "dataset":
        parts.append(f"capped at the {num_train} training examples, which fit")
    elif capped_by == "max_batch":
        parts.append(f"capped at max_batch={max_batch}, which fits")
    else:
        parts.append(f"smallest batch that did not fit: {failed[0].batch_size} ({failed[0].status})")
        parts.append(how)
    parts.append(f"peak at {answer}: {verified:.1f} MB of {budget:.1f} MB ({source})")
    return AutoBatchResult(
        batch_size=answer,
        probes=tuple(probes),
        intercept_mb=fit.intercept_mb,
        mb_per_example=fit.mb_per_example,
        budget_mb=budget,
        budget_source=source,
        predicted_peak_mb=fit.peak_at(answer),
        verified_peak_mb=verified,
        device=str(dev),
        precision=precision,
        method="; ".join(parts),
        num_train=num_train,
        capped_by=capped_by,
    )


# ---- the CPU probe process ------------------------------------------------------------
#
# The helper reads one request per line on stdin (base64 of a pickle: it is our own
# process) and answers one JSON line per request. For each request it forks a child that
# builds the task, takes warm-up steps (threads, arenas, optimizer state), sets
# RLIMIT_AS, resets VmHWM and takes the measured steps. The helper never runs a torch op
# itself, so every child starts from a process with no thread pools to inherit.


class _ProbeServer:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (closed in close())
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        # A fixed mmap threshold turns off glibc's dynamic one, which otherwise keeps freed
        # tensors of up to 32 MB in the heap and makes the peak of the same step differ by
        # 30% from one process to the next (see the module docstring).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "batchscope.trainers.autobatch", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # its own process group: a timeout ends it and its child
        )
        self._buffer = b""

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        line = base64.b64encode(pickle.dumps(payload)) + b"\n"
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise AutoBatchError(f"the probe process exited early:\n{self._stderr_tail()}") from None
        reply = self._read_line()
        return dict(json.loads(reply))

    def _read_line(self) -> bytes:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([fd], [], [], self.timeout_s)
            if not ready:
                self._kill()
                raise AutoBatchError(f"a memory probe took longer than {self.timeout_s:g} s; it was stopped.")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AutoBatchError(f"the probe process exited early:\n{self._stderr_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def _kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def close(self, *, kill: bool = False) -> None:
        try:
            if kill:
                self._kill()
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            self._kill()
        finally:
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._stderr.close()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def _child_probe(request: dict[str, Any], report: Callable[[dict[str, Any]], None]) -> None:
    """In the forked child: warm up, limit the address space, measure the training steps."""
    spec: TrainSpec = request["spec"]
    batch_size: int | None = request["batch_size"]
    budget: float = request["budget_mb"]
    device = torch.device("cpu")
    baseline: float | None = None
    loaded = set(sys.modules)
    try:
        task, precision = _build(spec, device)
        runner = _StepRunner(spec, task, device, precision)
        runner.run(min(2, batch_size or 2))
        # Start the intra-op thread pool (their stacks) before the limit: steps that small may not.
        torch.ones(1 << 22).add_(1)
        # The helper imports these too, so that later children do not import them again.
        report({"num_train": task.num_train, "imported": [m for m in sys.modules if m not in loaded]})
        if batch_size is None:
            report({"status": "primed"})
            return
        baseline = _status_mb("VmRSS")
        headroom = budget - baseline
        if math.isfinite(headroom):
            headroom = max(headroom, 0.0)
            slack = _AS_SLACK_MB + _AS_SLACK_FRACTION * headroom + _AS_SLACK_PER_THREAD_MB * torch.get_num_threads()
            limit_mb = _status_mb("VmSize") + headroom + slack
            _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = int(limit_mb * 2**20)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        report({"armed": True, "baseline_mb": baseline})
        reset_peak_memory(device)
        runner.run(batch_size)
        peak = peak_memory_mb(device)
        report({"status": "ok", "peak_mb": peak, "baseline_mb": baseline, "num_train": task.num_train})
    except Exception as exc:
        if is_oom_error(exc):
            report({"status": "oom", "detail": _first_line(exc), "baseline_mb": baseline})
        else:
            report({"status": "error", "detail": traceback.format_exc()})


def _serve() -> None:
    """The helper process: fork one child per request line, answer one JSON line each."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the replies
    # Every optimizer's constructor imports torch._dynamo (seconds): once here, not per child.
    _import_quietly(["torch._dynamo"])
    for line in sys.stdin:
        if not line.strip():
            continue
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_fd)
            code = 0
            try:
                request = pickle.loads(base64.b64decode(line))
                _child_probe(request, functools.partial(_write_message, write_fd))
            except BaseException:
                code = 1
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            messages = [json.loads(m) for m in r.read().splitlines() if m.strip()]
        _, wait_status = os.waitpid(pid, 0)
        reply: dict[str, Any] = {}
        for m in messages:
            reply.update(m)
        if "status" not in reply:
            reply.update(_died(wait_status, armed=bool(reply.get("armed"))))
        imported = reply.pop("imported", [])
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
        _import_quietly(imported)


def _import_quietly(names: Sequence[str]) -> None:
    """Import what a probe child imported (recipe data libraries, torch._dynamo for the
    optimizers): seconds per child on a small machine. Imports only, never a torch op."""
    for name in names:
        if name in sys.modules or name.startswith("__"):
            continue
        try:
            importlib.import_module(name)
        except Exception:
            continue


def _write_message(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def _died(wait_status: int, *, armed: bool) -> dict[str, Any]:
    """A child that ended without a reply: killed (the OOM killer) or crashed."""
    if os.WIFSIGNALED(wait_status):
        sig = signal.Signals(os.WTERMSIG(wait_status)).name
        if sig == "SIGKILL":
            return {"status": "oom", "detail": "killed by SIGKILL (the kernel's out-of-memory killer?)"}
        if armed:
            # Under the address-space limit, a crash is an allocation that failed where no
            # exception could be raised (a thread stack, an abort in a C++ library).
            return {"status": "oom", "detail": f"crashed with {sig} under the address-space limit"}
        return {"status": "error", "detail": f"the probe process crashed with {sig} before the measured steps"}
    return {"status": "error", "detail": f"the probe process exited with status {os.WEXITSTATUS(wait_status)}"}


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        sys.exit("usage: python -m batchscope.trainers.autobatch --serve (the CPU probe helper of find_batch_size)")

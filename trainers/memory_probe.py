"""Peak memory of real training steps at a given batch size: the measurements AutoBatch searches over.

Where the memory is measured:

- CUDA: in this process, `torch.cuda.max_memory_allocated` after a reset, against
  `fraction` × (free device memory + what this process's allocator already holds).
  Only out-of-memory errors are caught; memory is released after each probe.
- CPU: each probe runs in its own child process, so its peak resident memory (VmHWM)
  is its own: a helper process (trainers/probe_server.py, `python -m batchscope.trainers.probe_server --serve`)
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

Either form of task is probed with batches drawn as the loop draws them
(trainers/data.py: `train_batches`), so a `DataTask`'s probes train on real batches of its
data (tensors, tuples or dicts) at the probed size, with its own `step` loss. They load
in-process (no DataLoader workers): on a CPU, a batch is part of the probe's peak as it is of
the training process's. A stream whose epoch holds no batch of the probed size (its data is
smaller) answers `no_batch`, and the search treats it as the in-memory path treats a batch
past the training set: the cap.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import math
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import torch

from batchscope.trainers.batches import task_loss
from batchscope.trainers.data import EmptyEpochError, train_batches
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
from batchscope.trainers.recipes import build_any_task, stated_num_train
from batchscope.trainers.spec import TrainSpec
from batchscope.trainers.task import DataTask, Task

ProbeStatus = Literal["ok", "over_budget", "oom", "no_batch"]

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
    peak is above the budget), `oom` (an allocation failed; `peak_mb` is then None) or
    `no_batch` (a stream's epoch holds no batch this large: its data is smaller).
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


# ---- real training steps ----------------------------------------------------------


class StepRunner:
    """Training steps as the loop takes them, with a fresh optimizer, on a task it owns."""

    def __init__(self, spec: TrainSpec, task: Task | DataTask, device: torch.device, precision: Precision) -> None:
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
        # The loop's own batches (a Task's indexed on the device, the same indices as its
        # DeviceBatcher), loaded in-process: a probe takes a few steps.
        batches = train_batches(task, batch_size, self.spec.seed, slice(None), self.device, num_workers=0)
        for i in range(steps + _MAX_SCALER_SKIPS):
            if i >= steps and self.steps_taken > 0:
                break
            batch = batches.next()
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                loss = task_loss(task, task.model, batch)
            scaler.scale(loss).backward()
            before = scaler.get_scale() if scaler.is_enabled() else 0.0  # host sync: probes only
            scaler.step(self.optimizer)
            scaler.update()
            # A skipped step (inf/NaN gradients) lowers the scale; otherwise it stays or grows.
            if not scaler.is_enabled() or scaler.get_scale() >= before:
                self.steps_taken += 1
        del batch, loss


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


def build_probe_task(spec: TrainSpec, device: torch.device) -> tuple[Task | DataTask, Precision]:
    seed_everything(spec.seed)
    precision = make_precision(resolve_precision(spec.precision, device), device)
    task = build_any_task(spec.recipe, spec.model, spec.recipe_options, device)
    return task, precision


def train_size(spec: TrainSpec, task: Task | DataTask) -> int | None:
    """The training-set size AutoBatch caps at: the task's, or for a stream the recipe's
    `Recipe.num_train` where it gives one (None: unknown, the stream itself says when a batch
    is too large for it)."""
    return task.num_train if task.num_train is not None else stated_num_train(spec.recipe, spec.recipe_options)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---- the prober ------------------------------------------------------------------


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
        self._server: _ProbeProcess | None = None
        self._task: Task | DataTask | None = None
        self._precision: Precision | None = None

    def __enter__(self) -> MemoryProber:
        if self.device.type == "cpu":
            self._server = _ProbeProcess(self.timeout_s)
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
        if reply.get("status") == "refused":  # the recipe's own one-line refusal, not a crash
            raise AutoBatchError(str(reply.get("detail", "")))
        if reply.get("status") != "primed":
            raise AutoBatchError(f"the probe process could not build the task:\n{reply.get('detail', '')}".rstrip())
        self.num_train = None if reply.get("num_train") is None else int(reply["num_train"])

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
        if status in ("oom", "no_batch"):
            return Probe(batch_size, status, None, reply.get("baseline_mb"), str(reply.get("detail", "")))
        if status == "refused":
            raise AutoBatchError(f"at batch size {batch_size}: {reply.get('detail', '')}")
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
            self._task, self._precision = build_probe_task(self.spec, self.device)
            self.num_train = train_size(self.spec, self._task)
        assert self._precision is not None
        runner: StepRunner | None = None
        baseline: float | None = None
        peak: float | None = None
        detail = no_batch = ""
        try:
            runner = StepRunner(self.spec, self._task, self.device, self._precision)
            runner.run(min(2, batch_size))  # optimizer state, cuBLAS workspaces: part of every step
            torch.cuda.synchronize(self.device)
            baseline = torch.cuda.memory_allocated(self.device) / 2**20
            reset_peak_memory(self.device)
            runner.run(batch_size)
            torch.cuda.synchronize(self.device)  # host sync: the measurement point
            peak = peak_memory_mb(self.device)
        except EmptyEpochError as exc:
            no_batch = str(exc)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            detail = first_line(exc)
        finally:
            # The probe's optimizer state and gradients go; the task stays for the next probe.
            del runner
            for p in self._task.model.parameters():
                p.grad = None
            _release(self.device)
        if no_batch:
            return Probe(batch_size, "no_batch", None, baseline, no_batch)
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


# ---- the helper's protocol -------------------------------------------------------------
#
# One request per line on the helper's stdin (base64 of a pickle: it is our own process),
# one JSON line per reply on its stdout.


def encode_request(payload: dict[str, Any]) -> bytes:
    return base64.b64encode(pickle.dumps(payload)) + b"\n"


def decode_request(line: str | bytes) -> dict[str, Any]:
    return dict(pickle.loads(base64.b64decode(line)))


class _ProbeProcess:
    """The CPU probe helper, from the prober's side: started, sent requests, stopped."""

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
            [sys.executable, "-m", "batchscope.trainers.probe_server", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,  # its own process group: a timeout ends it and its child
        )
        self._buffer = b""

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        line = encode_request(payload)
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

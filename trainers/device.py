"""Device, precision and measurement decided once, before the training loop."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'.")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return dev
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}.")


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}.")
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16' was asked for but this GPU does not support bf16; use fp16.")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# `(model, batch) -> loss`: the training step's forward pass (trainers.batches.loss_function).
LossOf = Callable[[torch.nn.Module, Any], torch.Tensor]


@dataclass
class Precision:
    """The autocast context and gradient scaler for one precision, built once.

    The training step takes its forward, backward and optimizer step from here, decided once:
    in fp32 the autocast is a nullcontext and the scaler passes everything through, six Python
    calls a step that cost ~3 µs of a ~170 µs step at batch 16 on the CPU.
    """

    name: str
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    scaler: torch.amp.GradScaler

    def autocast_loss(self, loss_of: LossOf) -> LossOf:
        """`loss_of` under this precision's autocast (itself in fp32, which has none)."""
        if self.name == "fp32":
            return loss_of
        autocast = self.autocast

        def under_autocast(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            with autocast():
                return loss_of(model, batch)

        return under_autocast

    def backward(self) -> Callable[[torch.Tensor], None]:
        """The backward pass of a loss: of the scaled loss with fp16, of the loss itself otherwise."""
        if not self.scaler.is_enabled():
            return torch.Tensor.backward
        scale = self.scaler.scale
        return lambda loss: scale(loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
        """The optimizer's step: through the scaler with fp16 (it skips steps with inf/NaN gradients
        and updates its scale), `optim.step_function` (as the optimizer is now) otherwise."""
        if not self.scaler.is_enabled():
            from batchscope.trainers.optim import step_function

            return step_function(optimizer)
        scaler = self.scaler

        def scaled_step() -> None:
            scaler.step(optimizer)
            scaler.update()

        return scaled_step


def make_precision(name: str, device: torch.device) -> Precision:
    dtype = _DTYPES[name]
    enabled = name != "fp32"

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
    scaler = torch.amp.GradScaler(device.type, enabled=(name == "fp16"))
    return Precision(name=name, autocast=autocast, scaler=scaler)


class Clock:
    """Wall time that is exact on CUDA: synchronizes, but only when read.

    Read it at measurement points (evaluations), never per step.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device

    def now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize(self._device)  # CPU-GPU sync point, at measurement points only
        return time.perf_counter()


class StepTimer:
    """Times single steps without a host sync per step.

    CPU: perf_counter. CUDA: a pair of events per step, read together by `results`
    (one host sync). For a handful of steps, e.g. calibrating the noise-scale cadence.
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._open: Any = None
        self._done: list[tuple[bool, Any, Any]] = []

    def start(self) -> None:
        if self._cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self, tag: bool) -> None:
        end: Any
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self._done.append((tag, self._open, end))

    def results(self) -> list[tuple[bool, float]]:
        """(tag, seconds) per timed step; clears them."""
        done, self._done = self._done, []
        if self._cuda and done:
            done[-1][2].synchronize()  # host sync: once, when the timings are read
            return [(tag, a.elapsed_time(b) / 1000.0) for tag, a, b in done]
        return [(tag, b - a) for tag, a, b in done]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux lets a process reset its own resident-set high-water mark (VmHWM).
    with contextlib.suppress(OSError), open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by tensors. CPU: peak resident memory of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

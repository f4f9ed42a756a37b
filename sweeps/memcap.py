"""The memory cap of CPU trials: one absurd batch ends as `oom`, not in the kernel's OOM killer.

A CPU trial's memory is capped by its address space (RLIMIT_AS, the soft limit only, so the
next trial in the same worker can have another cap): its size when the worker had imported
torch, plus the cap. An allocation past it raises torch's "can't allocate memory", which the
training loop ends as `oom` (trainers.loop.is_oom_error). Without a cap, `batchscope train
--batch-size 1000000000000` grew to 24 GB before the kernel killed it, with the machine swapping.

The default cap (when `train.memory_limit_mb` is not set) is a share of the memory available
when the sweep starts, split between the trials that run at once. Not for CUDA trials: the CUDA
driver reserves far more address space than it uses, and GPU memory is not capped this way.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

# Share of the available memory that the trials running at once may use together; the rest is
# for the sweep process, MLflow, and whatever else runs on the machine.
DEFAULT_SHARE = 0.75


def available_mb() -> float | None:
    """Memory available now: /proc/meminfo's MemAvailable, or less if a cgroup limit is lower."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        available = int(info["MemAvailable"]) / 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    cgroup = _cgroup_room_mb()
    return min(available, cgroup) if cgroup is not None else available


def _cgroup_room_mb() -> float | None:
    """What a cgroup v2 memory limit leaves (limit − current usage); None without one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text().strip())
        return max(0.0, (int(limit) - used) / 2**20)
    except (OSError, ValueError):
        return None


def default_cap_mb(trials_at_once: int) -> float | None:
    """The default cap of one CPU trial, in MB; None where the available memory cannot be read."""
    if trials_at_once < 1:
        raise ValueError(f"trials_at_once must be at least 1, got {trials_at_once}")
    room = available_mb()
    return None if room is None else round(DEFAULT_SHARE * room / trials_at_once)


def vm_size_kb() -> int | None:
    """This process's address-space size (VmSize) in kB; None off Linux."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None


def apply_cap(limit_mb: float | None, baseline_kb: int | None) -> None:
    """Cap this process's address space at `baseline_kb` + `limit_mb` (None lifts the cap)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if limit_mb is None or baseline_kb is None:
        soft = hard
    else:
        soft = (baseline_kb + int(limit_mb * 1024)) * 1024
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

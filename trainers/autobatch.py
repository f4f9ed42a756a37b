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
times `min_batch`); a cap (`max_batch`, or the training set) is used exactly. A stream of
unknown size that holds no batch of a probed size (`no_batch`) bounds the search as a batch
that does not fit does, and the answer is reported as capped by the training data.

What is probed, and how the memory is measured on CUDA and on a CPU: trainers/memory_probe.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batchscope.trainers.device import resolve_device
from batchscope.trainers.memory_probe import AutoBatchError, MemoryProber, Probe, preserved_rng
from batchscope.trainers.spec import TrainSpec

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

# Stop bisecting when the bracket is this small relative to the batch that fits.
_REL_TOL = 1 / 32
_MAX_PROBES = 40


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
    """Grow, fit, verify, bisect (see the module docstring). Returns (answer, probes, how).

    `cap` is read after the first probe (which tells the prober the size of the training set).
    """
    trail = _Trail(probe)
    first = trail.run(min_batch)
    if not first.fits:
        raise AutoBatchError(_nothing_fits(first, budget_mb), trail)
    lo, hi = _grow(trail, budget_mb, min_batch, cap())
    if hi is None:
        return lo, trail, f"the cap {lo} fits"
    verified = False
    # A stream too small for the batch says nothing of memory: no line reaches that far.
    if trail[-1].status != "no_batch":
        lo, hi, verified = _fit_and_verify(trail, budget_mb, lo, hi)
    if verified:
        return lo, trail, "fit, verified"
    lo = _bisect(trail, lo, hi)
    return lo, trail, f"bisection to within {_tolerance(lo)}"


class _Trail(list[Probe]):
    """Every probe of one search, in the order they ran."""

    def __init__(self, probe: Callable[[int], Probe]) -> None:
        super().__init__()
        self._probe = probe

    def run(self, batch_size: int) -> Probe:
        result = self._probe(batch_size)
        self.append(result)
        return result


def _grow(trail: _Trail, budget_mb: float, lo: int, limit: int) -> tuple[int, int | None]:
    """Larger batches from `lo` until one does not fit: (largest that fits, smallest that did not).

    The next batch is ×8 while the last probe used under 1/16 of the headroom above the
    first, ×4 under 1/8, else ×2; the second value is None when the cap `limit` fits.
    """
    base = trail[0].peak_mb or 0.0
    head = budget_mb - base
    while lo < limit:
        last = trail[-1].peak_mb or base
        used = (last - base) / head if head > 0 else 1.0
        factor = 8 if used < 1 / 16 else 4 if used < 1 / 8 else 2
        b = min(limit, lo * factor)
        if not trail.run(b).fits:
            return lo, b
        lo = b
    return lo, None


def _fit_and_verify(trail: _Trail, budget_mb: float, lo: int, hi: int) -> tuple[int, int, bool]:
    """Probe the batch where the line fitted to every probe reaches the budget, and refit.

    Returns (lo, hi, True) once a prediction fits and the refitted line predicts nothing
    larger (or nothing lies between), and (lo, hi, False) when a prediction did not fit or
    no line can be fitted: then bisect between lo and hi.
    """
    while hi - lo > _tolerance(lo) and len(trail) < _MAX_PROBES:
        fit = fit_line(trail)
        if fit is None:
            return lo, hi, False
        candidate = _inside(fit.largest_under(budget_mb), lo, hi)
        if candidate is None:
            return lo, hi, True
        if not trail.run(candidate).fits:
            return lo, candidate, False
        lo = candidate
        refit = fit_line(trail)
        if refit is None or refit.largest_under(budget_mb) < lo + _tolerance(lo):
            return lo, hi, True
    return lo, hi, True


def _bisect(trail: _Trail, lo: int, hi: int) -> int:
    """Halve the bracket (lo fits, hi does not) to within the tolerance; the largest batch that fitted."""
    while hi - lo > _tolerance(lo) and len(trail) < _MAX_PROBES:
        candidate = _inside((lo + hi) / 2, lo, hi)
        if candidate is None:
            break
        if trail.run(candidate).fits:
            lo = candidate
        else:
            hi = candidate
    return lo


def _nothing_fits(first: Probe, budget_mb: float) -> str:
    if first.status == "no_batch":
        return f"the training data gives no batch of {first.batch_size} examples ({first.detail})"
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
    failed = sorted((p for p in probes if not p.fits), key=lambda p: p.batch_size)
    if answer == cap() and not any(p.batch_size > answer for p in probes):
        capped_by = "dataset" if cap_at_dataset and num_train is not None and answer == num_train else "max_batch"
    elif failed and failed[0].status == "no_batch":
        capped_by = "dataset"  # a stream smaller than the next batch tried: its size, not memory, bounds it
    where = "in forked child processes" if dev.type == "cpu" else "in this process"
    parts = [
        f"{len(probes)} probes of real training steps {where} ({spec.optimizer}, {precision}, {dev})",
        f"linear fit {fit.intercept_mb:.1f} MB + {fit.mb_per_example * 1024:.2f} KB/example",
    ]
    if capped_by == "dataset" and failed and failed[0].status == "no_batch":
        parts.append(f"capped by the training data, which gives no batch of {failed[0].batch_size} examples")
        parts.append(how)
    elif capped_by == "dataset":
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

"""The gradient noise scale measured by the training loop, as it trains (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training").

In-loop and cheap: each measuring step reuses its own batch (split in two, or the
micro-batches of gradient accumulation) and the estimate is read over a window of steps,
while the weights move. For a model at fixed weights, measured to a chosen precision,
see trainers/noise_scale_offline.py (`batchscope noise-scale`).

B_simple = tr(Σ) / |G|², estimated from squared gradient norms measured at two
batch sizes B_small < B_big (appendix A.1):

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each estimate is unbiased but noisy; numerator and denominator are averaged separately
over a window of steps and divided once (`ratio_of_means`). Measurements stay on the
device until the loop's next logging point reads them back with the losses.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import torch


def grad_sq_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Σ |∂L/∂θ|² over all parameters that have a gradient, as a 0-d fp32 device tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("no parameter has a gradient: call backward() first.")
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack([n.float() for n in norms]).square().sum()


def two_batch_estimates(
    g_small_sq: torch.Tensor | float, g_big_sq: torch.Tensor | float, b_small: float, b_big: float
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Unbiased estimates of (|G|², tr(Σ)) from squared gradient norms at two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small=} and {b_big=}.")
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


def ratio_of_means(grad_sq: Sequence[float], trace_sigma: Sequence[float]) -> tuple[float, float]:
    """B_simple = mean(tr Σ)/mean(|G|²) over paired measurements, and its standard error.

    The ratio of means, as in appendix A of McCandlish et al. (not the mean of noisy ratios).
    The error is the delta method's, SE(t̄/ḡ) ≈ sqrt(Var(t − R·g)/n)/|ḡ| with R = t̄/ḡ, which
    counts the correlation of the two estimates measured on the same batches. B_simple is NaN
    when ḡ ≤ 0 (the gradient is not distinguishable from the noise); the error is NaN below
    two measurements.
    """
    n = len(grad_sq)
    if n != len(trace_sigma):
        raise ValueError(f"need one tr(Σ) per |G|² estimate, got {n} and {len(trace_sigma)}.")
    if n == 0:
        return math.nan, math.nan
    g_mean, t_mean = sum(grad_sq) / n, sum(trace_sigma) / n
    if not g_mean > 0:
        return math.nan, math.nan
    ratio = t_mean / g_mean
    if n < 2:
        return ratio, math.nan
    resid = [t - ratio * g for g, t in zip(grad_sq, trace_sigma, strict=True)]
    mean_resid = sum(resid) / n
    var = sum((r - mean_resid) ** 2 for r in resid) / (n - 1)
    return ratio, math.sqrt(var / n) / g_mean


class NoiseScaleWindow:
    """The noise scale over training: every measurement kept, B_simple over a window of steps.

    Each measuring step gives one two-batch estimate of |G|² and of tr(Σ) (unbiased, noisy,
    either may be negative). They stay on the device until the loop's next logging point,
    which reads them back with the losses (no extra host sync), and are then logged as they
    are (`gns/grad_sq`, `gns/trace_sigma` at their step): negative and undefined reads included,
    so that any window can be recomputed from the stores as a ratio of means. At an evaluation
    the loop reads B_simple over the measurements of the last `window` training steps, with its
    standard error (`ratio_of_means`): a window of steps, the same in every run of a sweep
    whatever the measuring cadence, rather than an average over a number of measurements.
    """

    def __init__(self, window: int, population: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 step, got {window=}.")
        if population is not None and population < 2:
            raise ValueError(f"population must be at least 2, got {population=}.")
        self.window = window
        # Batches drawn without replacement from N examples: E|G_B|² = |G|² + tr(Σ)/B · (N−B)/(N−1).
        # The two-batch |G|² estimate is then low by tr(Σ)/(N−1) and tr(Σ) high by N/(N−1): corrected below.
        self.population = population
        self._pending_steps: list[int] = []
        self._pending: list[torch.Tensor] = []  # |G|², tr(Σ) of each pending measurement, in turn
        self._kept: list[tuple[int, float, float]] = []  # (step, |G|², tr Σ) within the window

    def update(self, g_small_sq: torch.Tensor, g_big_sq: torch.Tensor, b_small: float, b_big: float, step: int) -> None:
        """One measurement at `step` from the squared norms of the small and big batch's mean gradients."""
        grad_sq, trace = two_batch_estimates(g_small_sq, g_big_sq, b_small, b_big)
        assert isinstance(grad_sq, torch.Tensor) and isinstance(trace, torch.Tensor)
        n = self.population
        if n is not None and b_big < n:
            grad_sq = grad_sq + trace / n
            trace = trace * ((n - 1) / n)
        self._pending_steps.append(step)
        self._pending += [grad_sq.float().reshape(()), trace.float().reshape(())]

    def pending(self) -> list[torch.Tensor]:
        """The device values not read back yet: |G|², tr(Σ) of each measurement in turn."""
        return self._pending

    def receive(self, values: Sequence[float]) -> list[tuple[int, float, float]]:
        """Take the host copies of `pending()`; return the (step, |G|², tr Σ) measurements to log.

        Non-finite measurements (an fp16 step whose gradients overflowed) are dropped: they
        are an overflow, not a read of the noise.
        """
        if len(values) != len(self._pending):
            raise ValueError(f"expected {len(self._pending)} values for the pending measurements, got {len(values)}.")
        rows = [
            (step, float(values[2 * i]), float(values[2 * i + 1]))
            for i, step in enumerate(self._pending_steps)
            if math.isfinite(values[2 * i]) and math.isfinite(values[2 * i + 1])
        ]
        self._pending_steps, self._pending = [], []
        self._kept += rows
        return rows

    def read(self, step: int) -> dict[str, float]:
        """B_simple over the measurements in (step − window, step] and its standard error; nothing
        when the window's mean |G|² is not 3 standard errors above 0 (the reports then give a lower bound)."""
        self._kept = [m for m in self._kept if m[0] > step - self.window]
        if not self._kept:
            return {}
        grad_sq = [m[1] for m in self._kept]
        if len(grad_sq) >= 2 and statistics.fmean(grad_sq) < 3 * statistics.stdev(grad_sq) / math.sqrt(len(grad_sq)):
            # The mean |G|² is within 3 standard errors of 0: B_simple has no upper bound at this
            # precision (late in training at small batches) and the delta method's error means
            # nothing; near that threshold the windows that pass are those whose noise pushed |G|²
            # up, so their reads run low (benchmarks, section 7): 3, not 2.
            return {}
        ratio, stderr = ratio_of_means(grad_sq, [m[2] for m in self._kept])
        out: dict[str, float] = {}
        if math.isfinite(ratio):
            out["gns/b_simple"] = ratio
        if math.isfinite(stderr):
            out["gns/b_simple_se"] = stderr
        return out

    def state_dict(self) -> dict[str, object]:
        # Checkpoints are written at evaluation points, after the pending values were read back.
        return {"window": [list(m) for m in self._kept]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        kept = state.get("window", [])  # a checkpoint of the older EMA estimator has none: start afresh
        assert isinstance(kept, list)
        self._kept = [(int(s), float(g), float(t)) for s, g, t in kept]


class Cadence:
    """Which training steps measure the noise scale: fixed, or chosen from what measuring costs.

    Without accumulation a measuring step splits its batch in two (two forward/backward
    passes) and reads two gradient norms. On a large model on a GPU that costs little more
    than a plain step; on a small model on a CPU, bound by per-op overhead, about a second
    step. With `every=None` the run times `probes` measuring steps and twice as many plain
    ones early on (every third step measures, after `warmup` plain steps) and then measures
    every n-th step, n = extra / (budget × plain) rounded up to a power of two, so that the noise scale costs about
    `budget` of the training time wherever it runs. Each kind's fastest time is used: on a
    busy machine other work only ever adds time to a step.
    """

    def __init__(
        self,
        every: int | None,
        budget: float,
        first_step: int,
        *,
        warmup: int = 4,
        probes: int = 4,
        max_every: int = 128,
    ) -> None:
        if every is not None and every < 1:
            raise ValueError(f"every must be at least 1 (or None to choose it), got {every=}.")
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget=}.")
        self.every = every
        self.budget = budget
        self.max_every = max_every
        # Probe steps: [lo, hi); offsets 0, 3, 6, ... from lo measure, the others are plain.
        self._lo = first_step + warmup
        self._hi = self._lo + 3 * probes
        self.plain_s: list[float] = []
        self.measure_s: list[float] = []

    @property
    def chosen(self) -> bool:
        return self.every is not None

    def measures(self, step: int) -> bool:
        if self.every is not None:
            return step % self.every == 0
        return self._lo <= step < self._hi and (step - self._lo) % 3 == 0

    def probing(self, step: int) -> bool:
        """Whether `step` is timed (only before the cadence is chosen)."""
        return self.every is None and self._lo <= step < self._hi

    def due(self, step: int) -> bool:
        """Whether the timings are complete after `step`: time to call `choose`."""
        return self.every is None and step == self._hi - 1

    def record(self, measured: bool, seconds: float) -> None:
        (self.measure_s if measured else self.plain_s).append(seconds)

    def choose(self) -> int:
        """every = extra time of a measuring step / (budget × a plain step's time), rounded up to 2^k."""
        if not self.plain_s or not self.measure_s:
            self.every = 10
            return self.every
        plain = min(self.plain_s)
        extra = max(0.0, min(self.measure_s) - plain)
        need = max(1.0, extra / (self.budget * max(plain, 1e-12)))
        # Rounded up to a power of two: within budget, and the same choice from run to run unless the
        # cost sits near a boundary (the cadence decides which steps split their batch, and so the
        # last digits of the losses: runs that must match bit for bit should fix `every`).
        self.every = int(min(self.max_every, 2 ** math.ceil(math.log2(need) - 1e-9)))
        return self.every

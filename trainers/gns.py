"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

B_simple = tr(Σ) / |G|², estimated from squared gradient norms measured at two
batch sizes B_small < B_big (appendix A.1):

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each estimate is unbiased but noisy; numerator and denominator are smoothed
separately (bias-corrected EMAs) and divided only when read. Everything stays on
the device: reading the values is the only host sync.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

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


class NoiseScaleEMA:
    """Bias-corrected exponential moving averages of |G|² and tr(Σ), kept on the device."""

    def __init__(self, device: torch.device, beta: float = 0.95, population: int | None = None) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta=}.")
        if population is not None and population < 2:
            raise ValueError(f"population must be at least 2, got {population=}.")
        self.beta = beta
        # Batches drawn without replacement from N examples: E|G_B|² = |G|² + tr(Σ)/B · (N−B)/(N−1).
        # The two-batch |G|² estimate is then low by tr(Σ)/(N−1) and tr(Σ) high by N/(N−1): corrected below.
        self.population = population
        self._grad_sq = torch.zeros((), device=device)
        self._trace = torch.zeros((), device=device)
        # Weight of the EMA so far (1 − β^t), counted on device so skipped updates don't count.
        self._weight = torch.zeros((), device=device)
        self.updates = 0

    def update(self, g_small_sq: torch.Tensor, g_big_sq: torch.Tensor, b_small: float, b_big: float) -> None:
        grad_sq, trace = two_batch_estimates(g_small_sq, g_big_sq, b_small, b_big)
        assert isinstance(grad_sq, torch.Tensor) and isinstance(trace, torch.Tensor)
        n = self.population
        if n is not None and b_big < n:
            grad_sq = grad_sq + trace / n
            trace = trace * ((n - 1) / n)
        # fp16 steps with overflowing gradients are skipped rather than poisoning the average.
        ok = torch.isfinite(grad_sq) & torch.isfinite(trace)
        b = self.beta
        self._grad_sq = torch.where(ok, b * self._grad_sq + (1 - b) * grad_sq, self._grad_sq)
        self._trace = torch.where(ok, b * self._trace + (1 - b) * trace, self._trace)
        self._weight = torch.where(ok, b * self._weight + (1 - b), self._weight)
        self.updates += 1

    def read(self) -> dict[str, float]:
        """The smoothed values (a host sync: call at evaluation points only)."""
        if self.updates == 0:
            return {}
        w, g, t = torch.stack([self._weight, self._grad_sq, self._trace]).tolist()
        if w <= 0:
            return {}
        g, t = g / w, t / w
        out = {"gns/grad_sq": g, "gns/trace_sigma": t}
        # |G|² can come out ≤ 0 early in training when the noise dominates; B_simple is then undefined.
        if g > 0:
            out["gns/b_simple"] = t / g
        return out

    def state_dict(self) -> dict[str, object]:
        return {"grad_sq": self._grad_sq, "trace": self._trace, "weight": self._weight, "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name in ("grad_sq", "trace", "weight"):
            value = state[name]
            assert isinstance(value, torch.Tensor)
            setattr(self, f"_{name}", value.to(self._grad_sq.device))
        self.updates = int(state["updates"])  # type: ignore[call-overload]


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

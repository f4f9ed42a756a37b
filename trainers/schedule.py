"""Learning-rate scaling with batch size, warmup and decay."""

from __future__ import annotations

import math
from collections.abc import Callable

SCALING_EXPONENTS = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}


def scaled_lr(base_lr: float, batch_size: int, rule: str, reference_batch: int) -> float:
    """lr · (B / B_ref)^k with k = 1 (linear, Goyal et al. 2017), 0.5 (sqrt, Malladi et al. 2022) or 0."""
    if rule not in SCALING_EXPONENTS:
        raise ValueError(f"lr scaling rule must be one of {tuple(SCALING_EXPONENTS)}, got {rule!r}.")
    if reference_batch < 1:
        raise ValueError(f"reference_batch must be at least 1, got {reference_batch=}.")
    return base_lr * (batch_size / reference_batch) ** SCALING_EXPONENTS[rule]


def lr_multiplier(schedule: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Factor applied to the (scaled) lr after `step` optimizer steps: linear warmup, then decay."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"schedule must be constant, cosine or linear, got {schedule!r}.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor

"""The decisions a run makes once, before anything is built: device, precision, the batch split, the lr.

The one home of each: which device and precision (`resolve_device`, `resolve_precision`),
how the batch splits across processes and into micro-batches, which micro-batches the
noise scale's small batch spans, and the effective learning rate after the scaling rule.
The loop logs them whole (`RunPlan.resolved`) before its first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from batchscope.trainers import distributed
from batchscope.trainers.device import (
    Precision,
    make_precision,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from batchscope.trainers.optim import base_settings, coupled_settings
from batchscope.trainers.schedule import scaled_lr
from batchscope.trainers.spec import TrainSpec


def micro_batches(batch_size: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) slices covering the batch; the last may be smaller."""
    return [(lo, min(lo + micro_batch_size, batch_size)) for lo in range(0, batch_size, micro_batch_size)]


@dataclass
class RunPlan:
    """Device, precision, the batch split and the learning rate: decided once, logged whole."""

    device: torch.device
    precision: Precision
    world: int  # processes training data parallel (1: alone)
    local_batch: int  # this process's share of the batch
    shard: slice  # this process's slice of every global batch
    accum_plan: list[tuple[int, int]]  # the micro-batches of a plain step
    gns_on: bool
    gns_plan: list[tuple[int, int]]  # the micro-batches of a step that measures the noise scale
    small_at: int  # the noise scale's small batch ends with micro-batch gns_plan[small_at]
    lr: float
    optimizer_settings: dict[str, Any]  # after the batch-size couplings
    resolved: dict[str, Any]  # what the run returns and the sink logs as params


def plan_run(spec: TrainSpec) -> RunPlan:
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
    gns_plan, small_at = accum_plan, 0
    if W > 1:
        small_at = len(accum_plan) - 1
    elif len(accum_plan) < 2:
        gns_plan = micro_batches(B, (B + 1) // 2)
    lr = scaled_lr(spec.lr, B, spec.lr_scaling, spec.reference_batch)
    settings = base_settings(spec.optimizer, spec.momentum, spec.weight_decay, spec.optimizer_options)
    settings = coupled_settings(settings, spec.couple, B, spec.reference_batch, lr, spec.lr)
    resolved: dict[str, Any] = {
        "device": str(device),
        "precision": precision.name,
        "micro_batch_size": micro,
        "accum_steps": len(accum_plan),
        "effective_lr": lr,
        # What `mem/peak_mb` measures: tensors on a GPU, or the whole process on a CPU.
        "memory_measure": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }
    # The settings the batch size changed, as the optimizer gets them (sampled ones are the trial's params).
    resolved.update({f"effective_{name}": settings[name] for name in spec.couple if name in settings})
    if W > 1:
        resolved["world_size"] = W
    gns_on = spec.gns and B >= 2
    return RunPlan(device, precision, W, local_B, shard, accum_plan, gns_on, gns_plan, small_at, lr, settings, resolved)

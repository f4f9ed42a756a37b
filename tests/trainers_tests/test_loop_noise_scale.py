"""The training loop's own noise scale against exact values, at (nearly) fixed weights.

`train()` runs at a learning rate of 1e-9, so the weights stay where they are and the true
B_simple is known: in closed form for linear regression (201, see test_noise_scale_offline.py), and
from every per-example gradient (torch.func) for a small MLP. Each run measures on every step
and reads B_simple over the whole run as its window. Over seeds the reads must sit within
10% of the truth and their standard errors must cover it about 95% of the time.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch import nn

from batchscope.trainers.loop import train
from batchscope.trainers.spec import RecordingSink, TrainSpec
from batchscope.trainers.task import LossFn, Task
from tests.trainers_tests.test_noise_scale_offline import (  # one_thread: the same autouse fixture here
    exact_b_simple,
    half_squared_error,
    linear_regression,
    mlp_problem,
    one_thread,  # noqa: F401
)

SEEDS = range(20)


def in_loop_reads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, batch_size: int, steps: int
) -> list[tuple[float, float]]:
    """(B_simple, its standard error) read by the loop at its last evaluation, one per seed."""
    reads = []
    for seed in SEEDS:
        task = Task(copy.deepcopy(model), x, y, x[:200], y[:200], loss_fn, classification=False)
        spec = TrainSpec(
            batch_size=batch_size, lr=1e-9, momentum=0.0, max_steps=steps, eval_every=steps,
            gns_every=1, gns_window=steps, seed=seed, sharpness=False, device="cpu",
        )  # fmt: skip
        sink = RecordingSink()
        assert train(spec, sink, task).status == "ok"
        assert len(sink.history["gns/grad_sq"]) == steps  # every measurement is logged
        reads.append((sink.history["gns/b_simple"][-1][1], sink.history["gns/b_simple_se"][-1][1]))
    return reads


def check_calibrated(reads: list[tuple[float, float]], exact: float) -> None:
    covered = sum(abs(b - exact) <= 1.96 * se for b, se in reads) / len(reads)
    within = sum(abs(b / exact - 1) <= 0.10 for b, _ in reads) / len(reads)
    mean = statistics.fmean(b for b, _ in reads)
    # 95% coverage expected; 20 seeds put 80% about 3 binomial s.d. below it.
    assert covered >= 0.80, f"the standard error covers the truth in {covered:.0%} of seeds"
    assert within >= 0.80, f"{within:.0%} of reads within 10% of {exact:.1f}: {[round(b) for b, _ in reads]}"
    assert mean == pytest.approx(exact, rel=0.04)  # no bias beyond sampling noise


def test_linear_regression_in_loop_noise_scale_is_calibrated() -> None:
    # Batch 1024 split in halves of 512 on measuring steps; exact 201. Seen: 93% covered,
    # 97% within 10%, relative error about 4% per run of 400 steps.
    problem = linear_regression(n=20_000)
    reads = in_loop_reads(problem.model, problem.x, problem.y, half_squared_error, batch_size=1024, steps=250)
    check_calibrated(reads, problem.exact_b_simple)


def test_mlp_in_loop_noise_scale_matches_per_example_gradients() -> None:
    # 2000 examples, batches of 512 drawn without replacement (the loop corrects for the finite
    # population); exact 91.6 from torch.func per-example gradients. Seen: 96% covered, mean 90.4.
    model, x, y = mlp_problem()
    exact = exact_b_simple(model, x, y)
    reads = in_loop_reads(model, x, y, nn.functional.cross_entropy, batch_size=512, steps=200)
    check_calibrated(reads, exact)

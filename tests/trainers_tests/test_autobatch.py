"""AutoBatch: the search on exact memory lines, and on real training steps in a CPU helper process.

Memory is measured for real: the peak of a probe process against a budget (CPU), or the
allocator's peak (CUDA, only where there is a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from batchscope.trainers.autobatch import find_batch_size, search_batch_size
from batchscope.trainers.memory_probe import AutoBatchError, MemoryProber, Probe
from tests.trainers_tests.test_memory import cuda, spec


@pytest.fixture(scope="module")
def cpu_prober() -> Iterator[MemoryProber]:
    """One helper process for the CPU AutoBatch tests: starting one costs seconds of imports."""
    with MemoryProber(spec(), device="cpu") as prober:
        yield prober


def test_autobatch_on_cpu_stays_within_budget_and_near_the_largest_batch_that_fits(
    cpu_prober: MemoryProber,
) -> None:
    baseline = cpu_prober.probe(1).peak_mb  # the whole probe process: interpreter, torch, data, model
    assert baseline is not None
    budget = baseline + 200.0
    result = find_batch_size(spec(), budget_mb=budget, cap_at_dataset=False, max_batch=2**20, prober=cpu_prober)

    # What was chosen was measured, and within the budget.
    assert result.verified_peak_mb <= budget
    assert any(p.batch_size == result.batch_size and p.fits for p in result.probes)
    assert any(not p.fits for p in result.probes)  # the search went past the budget
    assert result.mb_per_example > 0 and result.capped_by is None
    assert result.device == "cpu" and result.precision == "fp32"

    # The largest batch that truly fits, by bisection with the same probe (no address-space limit).
    def fits(b: int) -> bool:
        p = cpu_prober.probe(b)
        return p.peak_mb is not None and p.peak_mb <= budget

    lo, hi = result.batch_size, math.ceil(result.batch_size / 0.8)
    assert not fits(hi), f"{hi} fits too:\n{result.table()}\n{result.method}"
    while hi - lo > max(8, lo // 32):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    print(f"\n{result.table()}\n{result.method}\nbisection: largest fitting batch in [{lo}, {hi})")
    assert result.batch_size >= 0.8 * lo


def test_autobatch_caps_at_the_training_set(cpu_prober: MemoryProber) -> None:
    # 960 training examples need far less than the budget: the answer is the whole set.
    result = find_batch_size(spec(), budget_mb=4096, prober=cpu_prober)
    assert result.batch_size == 960 and result.capped_by == "dataset"
    assert result.verified_peak_mb <= 4096
    assert "960 training examples" in result.method


def test_autobatch_says_what_it_measured_when_nothing_fits(cpu_prober: MemoryProber) -> None:
    # The interpreter and torch alone take more than 64 MB: no silent default.
    with pytest.raises(AutoBatchError, match=r"no batch size fits: .*batch size 1, measured .* budget of 64\.0 MB"):
        find_batch_size(spec(), budget_mb=64, prober=cpu_prober)


def test_autobatch_refuses_a_prober_for_another_spec(cpu_prober: MemoryProber) -> None:
    with pytest.raises(ValueError, match="same spec"):
        find_batch_size(spec(optimizer="adamw"), budget_mb=4096, prober=cpu_prober)


def _linear_memory(base: float, per_example: float, budget: float, *, oom_above: float = math.inf):
    """A probe whose peak is an exact line: the search's arithmetic alone."""
    seen: list[int] = []

    def probe(b: int) -> Probe:
        seen.append(b)
        peak = base + per_example * b
        if peak > oom_above:
            return Probe(b, "oom", None)
        return Probe(b, "ok" if peak <= budget else "over_budget", peak)

    return probe, seen


@pytest.mark.parametrize(
    ("base", "per_example", "budget", "expected"),
    [
        (300.0, 0.004, 600.0, 75000),  # fitted, verified: (600 − 300)/0.004
        (300.0, 1.0, 1300.0, 1000),
        (300.0, 0.004, 300.5, 125),
    ],
)
def test_search_lands_on_the_line_under_the_budget(
    base: float, per_example: float, budget: float, expected: int
) -> None:
    probe, seen = _linear_memory(base, per_example, budget)
    answer, _, _ = search_batch_size(probe, budget_mb=budget, min_batch=1, cap=lambda: 10**9)
    assert expected - max(8, expected // 32) <= answer <= expected
    assert len(seen) <= 14


def test_search_bisects_when_allocations_fail_before_the_budget() -> None:
    # Allocations fail (no peak to fit) above 700 MB although the budget is 1000 MB.
    probe, _ = _linear_memory(300.0, 0.01, 1000.0, oom_above=700.0)
    answer, _, how = search_batch_size(probe, budget_mb=1000.0, min_batch=1, cap=lambda: 10**9)
    assert 40000 * (1 - 1 / 32) <= answer <= 40000
    assert "bisection" in how


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_autobatch_on_cuda_stays_within_budget_and_near_the_largest_batch_that_fits(precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    s = spec(device="cuda", precision=precision, recipe_options={"num_samples": 1200, "hidden": 1024})
    budget = 1024.0
    rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    result = find_batch_size(s, budget_mb=budget, cap_at_dataset=False, max_batch=2**22)
    assert torch.equal(torch.get_rng_state(), rng[0]) and torch.equal(torch.cuda.get_rng_state(), rng[1])
    assert result.device.startswith("cuda") and result.precision == precision
    assert result.verified_peak_mb <= budget
    assert any(not p.fits for p in result.probes)
    with MemoryProber(s, budget_mb=budget) as prober:
        too_big = prober.probe(math.ceil(result.batch_size / 0.8))
    print(f"\n{result.table()}\n{result.method}\nat {too_big.batch_size}: {too_big}")
    assert not too_big.fits


@cuda
def test_cuda_probe_that_runs_out_of_memory_is_reported_and_released() -> None:
    s = spec(device="cuda")
    with MemoryProber(s, budget_mb=math.inf) as prober:
        small = prober.probe(64)
        allocated = torch.cuda.memory_allocated()
        # 2**27 examples: 21 GB of inputs and 54 GB per hidden layer.
        huge = prober.probe(2**27)
        assert small.fits and huge.status == "oom" and huge.peak_mb is None
        assert torch.cuda.memory_allocated() <= allocated  # nothing of the failed probe is left
        assert prober.probe(64).fits

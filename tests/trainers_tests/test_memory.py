"""Memory and throughput: gradient accumulation, OOM under real limits, AutoBatch, precisions, inference.

Everything runs real training on MNIST-1D. Memory limits are real: an address-space
limit (RLIMIT_AS) in a child process, or a peak-memory budget measured by AutoBatch.
CUDA tests run only where there is a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from batchscope.trainers.autobatch import find_batch_size, search_batch_size
from batchscope.trainers.loop import is_oom_error, micro_batches, train
from batchscope.trainers.memory_probe import AutoBatchError, MemoryProber, Probe
from batchscope.trainers.recipes import build_task
from batchscope.trainers.spec import RecordingSink, TrainSpec
from batchscope.trainers.task import Task
from batchscope.trainers.throughput import measure_inference

OPTS = {"num_samples": 1200}
REPO = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def spec(**kw: object) -> TrainSpec:
    base: dict = dict(
        recipe_options=OPTS,
        batch_size=64,
        lr=0.1,
        max_steps=10,
        eval_every=10,
        device="cpu",
        precision="fp32",
        sharpness=False,
    )
    base.update(kw)
    return TrainSpec(**base)


# ---- gradient accumulation ----------------------------------------------------------


@pytest.mark.parametrize("micro", [16, 24, 1])
def test_accumulated_gradients_equal_the_full_batch_gradient(micro: int) -> None:
    # The loop's weighting, mean loss of each micro-batch × (its size / B), sums to the
    # full-batch mean, also when the last micro-batch is smaller (64 = 24 + 24 + 16).
    torch.manual_seed(0)
    task = build_task("mnist1d", "mlp", OPTS, torch.device("cpu"))
    x, y, B = task.train_x[:64], task.train_y[:64], 64
    params = list(task.model.parameters())

    task.loss_fn(task.model(x), y).backward()
    full = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    for p in params:
        p.grad = None
    for lo, hi in micro_batches(B, micro):
        (task.loss_fn(task.model(x[lo:hi]), y[lo:hi]) * ((hi - lo) / B)).backward()
    for p, g in zip(params, full, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_training_with_micro_batches_or_noise_scale_split_gives_the_same_losses() -> None:
    # Accumulating 4 micro-batches of 16, or splitting the batch in halves to measure
    # the noise scale, only changes the order of float additions.
    runs = {}
    for gns in (False, True):
        for micro in (None, 16):
            sink = RecordingSink()
            result = train(spec(micro_batch_size=micro, gns=gns), sink)
            assert result.status == "ok"
            runs[gns, micro] = ([v for _, v in sink.history["train/loss"]], result.final["final/val_loss"])
    ref_losses, ref_val = runs[False, None]
    assert len(ref_losses) == 10
    for key, (losses, val) in runs.items():
        assert losses == pytest.approx(ref_losses, abs=1e-5), key
        assert val == pytest.approx(ref_val, abs=1e-5), key


# ---- out of memory under a real limit ---------------------------------------------------

_LIMITED_CHILD = textwrap.dedent(
    """
    import json, resource
    import torch
    from batchscope.trainers.loop import is_oom_error, train
    from batchscope.trainers.spec import TrainSpec
    from batchscope.trainers.throughput import measure_inference

    def spec(batch_size):
        return TrainSpec(recipe_options={"num_samples": 1200}, batch_size=batch_size, max_steps=2,
                         eval_every=2, device="cpu", precision="fp32", gns=False, sharpness=False)

    def status_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

    # Imports, data and thread pools first; then 256 MB of address space to spare: the
    # model (15 K parameters) fits, a batch of a million examples (400 MB per layer) does not.
    warm = train(spec(16))
    limit = int((status_mb("VmSize") + 256) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    big = train(spec(1_000_000))
    after = train(spec(16))
    try:
        torch.empty(2**31, dtype=torch.uint8).fill_(1)
        direct = None
    except Exception as exc:
        direct = [type(exc).__name__, is_oom_error(exc)]
    inference = measure_inference(spec(16), [16, 1_000_000], warmup=1, iters=3)
    print(json.dumps({
        "warm": warm.status, "big": big.status, "reason": big.reason, "after": after.status,
        "direct": direct, "inference": [[r.batch_size, r.status, r.samples_per_s] for r in inference],
    }))
    """
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def test_batch_too_big_for_an_address_space_limit_ends_as_oom_not_a_crash() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED_CHILD], capture_output=True, text=True, env=_child_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["warm"] == "ok"
    assert out["big"] == "oom", out
    assert "out of memory at batch size 1000000" in out["reason"]
    assert out["after"] == "ok"  # the process is still usable after the OOM
    assert out["direct"] == ["RuntimeError", True]  # a real failed allocation is classified as OOM
    (b16, s16, sps16), (b_big, s_big, _) = out["inference"]
    assert (b16, s16) == (16, "ok") and sps16 > 0
    assert (b_big, s_big) == (1_000_000, "oom")  # reported, not raised


def test_other_runtime_errors_are_not_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as shape_error:
        torch.zeros(2, 3) @ torch.zeros(4, 5)
    assert not is_oom_error(shape_error.value)
    assert not is_oom_error(ValueError("out of memory"))  # only RuntimeErrors are read by message
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))

    # A model that does not match its data fails the run with its own error, not `oom`.
    good = build_task("mnist1d", "mlp", OPTS, torch.device("cpu"))
    wrong = Task(
        model=torch.nn.Linear(7, 10),
        train_x=good.train_x,
        train_y=good.train_y,
        val_x=good.val_x,
        val_y=good.val_y,
        loss_fn=good.loss_fn,
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(spec(), task=wrong)


# ---- AutoBatch --------------------------------------------------------------------------


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


# ---- precisions ---------------------------------------------------------------------


def test_bf16_training_on_cpu() -> None:
    sink = RecordingSink()
    result = train(spec(precision="bf16", max_steps=30, eval_every=30), sink)
    losses = [v for _, v in sink.history["train/loss"]]
    assert result.status == "ok" and result.resolved["precision"] == "bf16"
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]


def _cpu_fp16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.Linear(4, 2)(torch.randn(3, 4))
        torch.amp.GradScaler("cpu", enabled=True)
        return out.dtype == torch.float16
    except (RuntimeError, TypeError, ValueError):
        return False


@pytest.mark.skipif(not _cpu_fp16_supported(), reason="this torch has no fp16 autocast or GradScaler on CPU")
def test_fp16_training_on_cpu_with_grad_scaler() -> None:
    sink = RecordingSink()
    result = train(spec(precision="fp16", max_steps=30, eval_every=30), sink)
    losses = [v for _, v in sink.history["train/loss"]]
    assert result.status == "ok" and result.resolved["precision"] == "fp16"
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]


# ---- inference throughput ---------------------------------------------------------------


def test_inference_throughput_grows_with_batch_on_cpu(tmp_path: Path) -> None:
    s = spec()
    task = build_task("mnist1d", "mlp", OPTS, torch.device("cpu"))
    weights = tmp_path / "model.pt"
    torch.save(task.model.state_dict(), weights)
    rng = torch.get_rng_state()
    # One thread: on a shared 2-core machine a parallel region waits for a descheduled
    # thread (milliseconds), which would time the neighbours rather than the model.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = measure_inference(s, [1, 8, 64], warmup=10, iters=100, weights=weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), rng)  # built and seeded without moving the caller's RNG
    assert [r.batch_size for r in results] == [1, 8, 64]
    assert all(r.status == "ok" and r.device == "cpu" and r.precision == "fp32" for r in results)
    rates = [r.samples_per_s for r in results]
    assert rates[0] < rates[1] < rates[2], rates
    for r in results:
        assert 0 < r.latency_p50_ms <= r.latency_p95_ms


def test_inference_leaves_a_given_model_in_training_mode() -> None:
    task = build_task("mnist1d", "mlp", OPTS, torch.device("cpu"))
    task.model.train()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    [result] = measure_inference(task, [32], warmup=1, iters=3)
    assert result.status == "ok" and task.model.training
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k])


# ---- CUDA ---------------------------------------------------------------------------


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


@cuda
def test_fp16_training_on_cuda_with_grad_scaler() -> None:
    sink = RecordingSink()
    result = train(spec(device="cuda", precision="fp16", max_steps=60, eval_every=30), sink)
    losses = [v for _, v in sink.history["train/loss"]]
    assert result.status == "ok" and result.resolved["precision"] == "fp16"
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]


@cuda
def test_inference_throughput_on_cuda_reports_oom_and_timings() -> None:
    results = measure_inference(spec(device="cuda"), [1, 256, 2**31], warmup=3, iters=20)
    ok = [r for r in results if r.status == "ok"]
    assert [r.batch_size for r in ok] == [1, 256]
    assert ok[0].samples_per_s < ok[1].samples_per_s
    assert all(0 < r.latency_p50_ms <= r.latency_p95_ms for r in ok)
    assert results[-1].status == "oom"

"""Inference throughput: examples per second and latency per batch size, measured on a real model."""

from __future__ import annotations

from pathlib import Path

import torch

from batchscope.trainers.recipes import build_task
from batchscope.trainers.throughput import measure_inference
from tests.trainers_tests.test_memory import OPTS, cuda, spec


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


@cuda
def test_inference_throughput_on_cuda_reports_oom_and_timings() -> None:
    results = measure_inference(spec(device="cuda"), [1, 256, 2**31], warmup=3, iters=20)
    ok = [r for r in results if r.status == "ok"]
    assert [r.batch_size for r in ok] == [1, 256]
    assert ok[0].samples_per_s < ok[1].samples_per_s
    assert all(0 < r.latency_p50_ms <= r.latency_p95_ms for r in ok)
    assert results[-1].status == "oom"

"""Memory in the training loop: gradient accumulation, OOM under real limits, precisions.

AutoBatch is tested in test_autobatch.py, inference throughput in test_throughput.py.

Everything runs real training on MNIST-1D. Memory limits are real: an address-space
limit (RLIMIT_AS) in a child process. CUDA tests run only where there is a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from batchscope.trainers.loop import is_oom_error, train
from batchscope.trainers.plan import micro_batches
from batchscope.trainers.recipes import build_task
from batchscope.trainers.spec import RecordingSink, TrainSpec
from batchscope.trainers.task import Task

OPTS = {"num_samples": 1200}
REPO = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def spec(**kw: object) -> TrainSpec:
    base: dict = dict(
        log_every_step=True,  # these tests read every step's loss
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


# ---- CUDA ---------------------------------------------------------------------------


@cuda
def test_fp16_training_on_cuda_with_grad_scaler() -> None:
    sink = RecordingSink()
    result = train(spec(device="cuda", precision="fp16", max_steps=60, eval_every=30), sink)
    losses = [v for _, v in sink.history["train/loss"]]
    assert result.status == "ok" and result.resolved["precision"] == "fp16"
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]

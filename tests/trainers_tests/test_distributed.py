"""Data-parallel training: two real gloo processes on the CPU, compared with one process.

The ranks are started once for the module with torch.multiprocessing (the torchrun
environment variables set by hand); each runs every case below and rank 0 writes
what it saw to a file that the tests compare with single-process runs.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from batchscope.trainers import distributed
from batchscope.trainers.checkpoint import CheckpointPolicy
from batchscope.trainers.loop import train
from batchscope.trainers.spec import RecordingSink, TrainResult, TrainSpec

WORLD = 2
LOSS_RTOL = 1e-4


def spec(**kw: Any) -> TrainSpec:
    base: dict[str, Any] = dict(
        log_every_step=True,  # these tests read every step's loss
        recipe_options={"num_samples": 1200},
        batch_size=64,
        lr=0.1,
        max_steps=30,
        eval_every=10,
        log_every=10,
        device="cpu",
        sharpness=False,
        gns_every=1,  # measure every step in both runs, so the estimates are comparable
    )
    base.update(kw)
    return TrainSpec(**base)


def data_spec(form: str) -> TrainSpec:
    """A recipe whose data streams (tests/trainers_tests/data_recipes.py): a Dataset, or a factory of dict batches."""
    return spec(recipe="tests.trainers_tests.data_recipes:build", model="mlp", recipe_options={"form": form}, gns=True)


class StopAt(RecordingSink):
    """A sink that prunes the run at `step` (only rank 0 has it)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        super().evaluated(step, values)
        return step < self.step


def _case(name: str, rank: int, out: Path) -> tuple[TrainResult | str, RecordingSink]:
    sink = RecordingSink()
    if name == "plain":
        return train(spec(gns=False), sink), sink
    if name == "gns":
        return train(spec(gns=True), sink), sink
    if name == "accum":  # gradient accumulation inside each process (32 per process, micro-batches of 16)
        return train(spec(gns=True, micro_batch_size=16), sink), sink
    if name in ("dataset", "stream"):  # each process loads its half of every global batch
        return train(data_spec(name), sink), sink
    if name == "pruned":  # rank 0's sink stops the run; rank 1 has a sink that never would
        sink = StopAt(20) if rank == 0 else RecordingSink()
        return train(spec(max_steps=60), sink), sink
    if name == "stopped":  # only rank 0 is asked to stop (at its second logging point)
        calls = iter(range(100))
        should_stop = (lambda: next(calls) >= 1) if rank == 0 else None
        return train(spec(), sink, should_stop=should_stop), sink
    if name == "checkpoint":
        policy = CheckpointPolicy(out / f"checkpoint-rank{rank}.pt", every_steps=10)
        return train(spec(max_steps=20), sink, checkpoint=policy), sink
    if name == "indivisible":
        try:
            train(spec(batch_size=63), sink)
        except ValueError as exc:
            return str(exc), sink
        return "no error", sink
    raise AssertionError(name)


CASES = ("plain", "gns", "accum", "dataset", "stream", "pruned", "stopped", "checkpoint", "indivisible")


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    device = distributed.init_from_env("cpu")
    assert device == torch.device("cpu")
    try:
        for name in CASES:
            result, sink = _case(name, rank, out)
            with open(out / f"{name}-rank{rank}.pkl", "wb") as f:
                pickle.dump({"result": result, "history": sink.history}, f)
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where the two processes, launched once for this module, left their records."""
    out = tmp_path_factory.mktemp("ddp")
    train(spec(max_steps=1, eval_every=1, gns=False))  # generate the cached data once, before the ranks read it
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def record(out: Path, case: str, rank: int = 0) -> dict[str, Any]:
    with open(out / f"{case}-rank{rank}.pkl", "rb") as f:
        return dict(pickle.load(f))


@pytest.mark.parametrize(
    ("case", "single"),
    [
        ("plain", spec(gns=False)),
        ("gns", spec(gns=True)),
        ("accum", spec(gns=True, micro_batch_size=16)),
        ("dataset", data_spec("dataset")),
        ("stream", data_spec("stream")),
    ],
)
def test_two_processes_follow_the_single_process_loss_curve(ddp_out: Path, case: str, single: TrainSpec) -> None:
    # Same global batch of 64 in the same order: 2 x 32 with averaged gradients is one process with 64.
    sink = RecordingSink()
    alone_result = train(single, sink)
    together = record(ddp_out, case)
    alone_losses, losses = sink.history["train/loss"], together["history"]["train/loss"]
    assert [s for s, _ in losses] == list(range(1, 31))  # every step once
    for (_, a), (_, b) in zip(alone_losses, losses, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    result = together["result"]
    assert result.status == "ok" and result.resolved["world_size"] == WORLD
    assert result.final["final/val_loss"] == pytest.approx(alone_result.final["final/val_loss"], rel=LOSS_RTOL)


def test_only_rank_0_reports(ddp_out: Path) -> None:
    assert record(ddp_out, "plain", 0)["history"]["train/loss"]
    assert record(ddp_out, "plain", 1)["history"] == {}  # rank 1's sink was never called


def test_noise_scale_is_measured_from_the_per_process_gradients(ddp_out: Path) -> None:
    # Single process, B=64: the first half (32) is the small batch, one sample of |G_small|².
    # Two processes: each process's 32 is a small batch and the two |G_small|² are averaged;
    # the big batch is 64 in both. Same expectation, different draws: every step is measured
    # in both, and the means over the run's 30 measurements agree within their sampling error.
    sink = RecordingSink()
    train(spec(gns=True), sink)
    history = record(ddp_out, "gns")["history"]
    assert [s for s, _ in history["gns/b_simple"]] == [10, 20, 30]
    for key in ("gns/grad_sq", "gns/trace_sigma"):
        together, alone = [v for _, v in history[key]], [v for _, v in sink.history[key]]
        assert [s for s, _ in history[key]] == [s for s, _ in sink.history[key]] == list(range(1, 31))
        spread = (statistics.stdev(together) ** 2 / 30 + statistics.stdev(alone) ** 2 / 30) ** 0.5
        assert abs(statistics.fmean(together) - statistics.fmean(alone)) < 3 * spread, key
    assert all(math.isfinite(v) and v > 0 for _, v in history["gns/b_simple"])
    assert "gns/b_simple" not in record(ddp_out, "plain")["history"]


def test_accumulation_inside_each_process_leaves_the_noise_scale_unchanged(ddp_out: Path) -> None:
    # The small batch is each process's whole slice (32), however it is split into micro-batches.
    plain, accumulated = record(ddp_out, "gns")["history"], record(ddp_out, "accum")["history"]
    for key in ("gns/b_simple", "gns/grad_sq", "gns/trace_sigma"):
        for (_, a), (_, b) in zip(plain[key], accumulated[key], strict=True):
            assert b == pytest.approx(a, rel=1e-4), key


def test_rank_0_prunes_every_process(ddp_out: Path) -> None:
    for rank in range(WORLD):
        result = record(ddp_out, "pruned", rank)["result"]
        assert (result.status, result.steps) == ("pruned", 20), rank


def test_a_stop_request_on_rank_0_stops_every_process(ddp_out: Path) -> None:
    for rank in range(WORLD):
        result = record(ddp_out, "stopped", rank)["result"]
        assert (result.status, result.steps) == ("failed", 20), rank


def test_only_rank_0_writes_checkpoints(ddp_out: Path) -> None:
    assert (ddp_out / "checkpoint-rank0.pt").exists()
    assert not (ddp_out / "checkpoint-rank1.pt").exists()


def test_batch_not_divisible_by_the_processes_is_refused(ddp_out: Path) -> None:
    for rank in range(WORLD):
        message = record(ddp_out, "indivisible", rank)["result"]
        assert "divisible" in message and "B=63" in message and "2 processes" in message, message

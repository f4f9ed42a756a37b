"""Tracking and noise-scale overhead: batchscope's loop against the bare loop, side by side.

batchscope runs with everything on (per-step train/loss, eval every 50 steps,
noise scale, a real MLflow child run written by the buffered sink); the bare loop
has nothing. Both train the same model on the same device-resident data for the
same number of steps in the same process; each pair is repeated and the median
ratio reported, so a noisy machine does not mislead.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.bare import bare_loop, build
from trainers.loop import train
from trainers.spec import RecordingSink, TrainSpec


@dataclass
class OverheadRow:
    batch_size: int
    bare_samples_per_s: float
    batchscope_samples_per_s: float
    ratio: float
    gns_ratio: float  # batchscope with noise scale / batchscope without
    syncs_per_step: float | None  # CUDA only: host syncs seen per training step


def _mlflow_sink(store: Path) -> tuple[Any, Any, str]:
    from mlflow import MlflowClient

    from sweeps.tracking import MlflowSink

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("bench", artifact_location=(store / "a").as_uri())
    run = client.create_run(exp_id)
    return MlflowSink(client, run.info.run_id), client, run.info.run_id


def _timed_train(spec: TrainSpec, tracking: str, store: Path, count_syncs: bool = False) -> tuple[float, int]:
    task = build(spec)
    sink: Any
    client = run_id = None
    if tracking == "mlflow":
        sink, client, run_id = _mlflow_sink(store)
    else:
        sink = RecordingSink()
    syncs = 0
    cuda = task.train_x.is_cuda
    if count_syncs and cuda:
        torch.cuda.set_sync_debug_mode("warn")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(spec, sink, task=task)
    elapsed = time.perf_counter() - start
    if count_syncs and cuda:
        torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    if client is not None:
        sink.close()
        client.set_terminated(run_id)
    return elapsed, syncs


def measure(
    batch_sizes: tuple[int, ...] = (16, 128, 1024),
    steps: int = 500,
    device: str = "cpu",
    precision: str = "auto",
    tracking: str = "mlflow",
    repeats: int = 3,
) -> list[OverheadRow]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        base = TrainSpec(
            recipe_options={"num_samples": 5000},
            max_steps=steps,
            eval_every=50,
            log_every=10,
            sharpness=False,
            device=device,
            precision=precision,
            lr=0.05,
        )
        # Warm-up of everything process-wide (imports, allocator, MLflow store creation).
        _timed_train(replace(base, max_steps=30), tracking, store)
        for b in batch_sizes:
            spec = replace(base, batch_size=b)
            bare, full, no_gns, syncs = [], [], [], []
            for _ in range(repeats):
                bare.append(bare_loop(spec, build(spec), steps))
                t, s = _timed_train(spec, tracking, store, count_syncs=True)
                full.append(t)
                syncs.append(s)
                no_gns.append(_timed_train(replace(spec, gns=False), tracking, store)[0])
            t_bare, t_full, t_nogns = (statistics.median(x) for x in (bare, full, no_gns))
            rows.append(
                OverheadRow(
                    b,
                    steps * b / t_bare,
                    steps * b / t_full,
                    t_bare / t_full,
                    t_nogns / t_full,
                    statistics.median(syncs) / steps if device.startswith("cuda") else None,
                )
            )
    return rows


def table(rows: list[OverheadRow]) -> str:
    lines = [
        "| batch | bare samples/s | batchscope samples/s | ratio (target ≥ 0.95) | noise-scale cost | syncs/step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sync = f"{r.syncs_per_step:.3f}" if r.syncs_per_step is not None else "–"
        lines.append(
            f"| {r.batch_size} | {r.bare_samples_per_s:,.0f} | {r.batchscope_samples_per_s:,.0f} | "
            f"{r.ratio:.3f} | {100 * (1 - r.gns_ratio):+.1f}% | {sync} |"
        )
    return "\n".join(lines)

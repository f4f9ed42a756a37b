"""The start-up of `batchscope sweep`, phase by phase (run as a subprocess by benchmarks/startup.py).

    python -m benchmarks.startup_probe CONFIG LAUNCH_TIME

Does what `batchscope sweep CONFIG` does before its first training step, in the same
order, and notes when each phase starts and ends in each process: the sweep process
(the CLI's imports, the config, the runner's imports, the stores: Optuna journal,
MLflow schema, experiment, parent run; Optuna's first ask) and a worker process
started the way TrialWorker starts one (spawn; as early as the CLI starts it), which
imports what the worker imports and runs its warm-up (where it has one), then, given the
job, builds data and model, makes the optimizer and trains the first `log_every` steps
(the worker does not open MLflow: the sweep process writes its metrics). The probe
repeats the work the code does; the end-to-end times of the real command are measured
separately (benchmarks/startup.py).

Prints one JSON list of [process, phase, start, end], in seconds after LAUNCH_TIME.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

T_START = time.time()  # before anything of batchscope is imported

Phase = tuple[str, str, float, float]


class Laps:
    """Consecutive phases of one process: each `lap(name)` ends a phase and starts the next."""

    def __init__(self, process: str, first: Phase) -> None:
        self.process = process
        self.phases: list[Phase] = [first]
        self._mark = time.time()

    def __call__(self, name: str) -> None:
        now = time.time()
        self.phases.append((self.process, name, self._mark, now))
        self._mark = now


def _worker_side(conn: Connection, spawned_at: float) -> None:
    """What sweeps.worker._worker_main does from its start to a trial's first steps."""
    lap = Laps("worker", ("worker", "spawn: a fresh interpreter", spawned_at, time.time()))

    from batchscope.sweeps import faults  # noqa: F401
    from batchscope.sweeps.sink import MlflowSink  # noqa: F401
    from batchscope.sweeps.store_setup import quiet_libraries
    from batchscope.trainers.loop import train

    quiet_libraries()
    lap("imports: torch, trainers")
    from batchscope.sweeps import worker

    prewarm = getattr(worker, "_prewarm", None)  # the worker's own warm-up, where it has one
    if prewarm is not None:
        prewarm()
        lap("pre-warm before the first job (sweeps.worker._prewarm)")
    spec: Any = conn.recv()  # the first job
    lap("waits for the first job")
    from batchscope.trainers.device import resolve_device
    from batchscope.trainers.recipes import build_task

    task = build_task(spec.recipe, spec.model, spec.recipe_options, resolve_device(spec.device))
    lap("data (from the cache) + model")
    import torch

    torch.optim.SGD(task.model.parameters(), lr=0.1)
    lap("first optimizer (torch imports torch._dynamo on the first one)")
    train(spec, None, task=task)
    lap(f"first {spec.max_steps} training steps")
    conn.send(lap.phases)


def main(config: Path, launched_at: float) -> list[Phase]:
    lap = Laps("sweep", ("sweep", "interpreter start", launched_at, T_START))

    import batchscope.sweeps.cli
    import batchscope.sweeps.commands

    lap("imports: sweeps.cli + sweeps.commands (rich)")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_side, args=(child, time.time()), daemon=True)
    early = hasattr(batchscope.sweeps.commands, "_early_workers")  # the CLI starts its workers before the stores
    if early:
        proc.start()
        lap("starts the worker process")
    from batchscope.sweeps.config_load import load_config

    cfg = load_config(config)
    lap("reads + validates the config (sweeps.config: pydantic; no torch)")
    from dataclasses import replace

    from batchscope.sweeps.runner import Sweep
    from batchscope.sweeps.specs import make_spec

    lap("imports: sweeps.runner (optuna, mlflow)")
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

    lap("imports: MLflow's SQL store (sqlalchemy, alembic; Sweep() does this)")
    from batchscope.sweeps.store_setup import check_tracking, resolve

    check_tracking(resolve(cfg.storage, cfg.tracking_uri))
    lap("stores: MLflow's schema, copied from the cache (Sweep() does this)")
    sweep = Sweep(cfg)
    lap("stores: the rest of Sweep(): Optuna journal, study, experiment, parent run, git")
    if not early:
        proc.start()
        lap("starts the worker process")
    trial = sweep.study.ask()
    lap("Optuna: ask for the first trial")
    spec = make_spec(cfg, 128, 0.05, 0)
    spec = replace(spec, max_steps=spec.log_every, eval_every=spec.log_every, sharpness=False)
    parent.send(spec)
    worker: list[Phase] = parent.recv()
    lap("waits for the worker")
    proc.join(30)
    from optuna.trial import TrialState

    sweep.study.tell(trial, state=TrialState.FAIL)
    sweep.tracker.client.set_terminated(sweep.parent_run_id)
    return [(p, name, a - launched_at, b - launched_at) for p, name, a, b in lap.phases + worker]


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), float(sys.argv[2]))))

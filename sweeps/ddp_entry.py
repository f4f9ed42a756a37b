"""One trial in several processes: the module that torchrun starts on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node N -m batchscope.sweeps.ddp_entry JOB_FILE RESULT_FILE

The sweep's worker process (sweeps/worker.py) pickles the trial's `Job` to JOB_FILE,
starts torchrun and waits. Every rank joins the process group and trains
(`batchscope.trainers.loop.train`, data parallel); rank 0 alone logs to the trial's MLflow run
and writes the outcome to RESULT_FILE: ("done", TrainResult) or ("error", message,
traceback). Files beside RESULT_FILE carry the rest: the worker creates
`RESULT_FILE.stop` to stop the run at its next logging point, rank 0 keeps the
latest training loss in `RESULT_FILE.progress` for the sweep's progress display,
and another rank that fails writes its error record to `RESULT_FILE.rank-N` (torchrun
may end rank 0 before it has written its own).

Such trials are not pruned: Optuna lives in the sweep process, and rank 0's sink
never asks the run to stop.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchscope.sweeps.tracking import MlflowSink
    from batchscope.sweeps.worker import Job


def stop_file(result_file: Path) -> Path:
    return result_file.with_name(result_file.name + ".stop")


def progress_file(result_file: Path) -> Path:
    return result_file.with_name(result_file.name + ".progress")


def rank_error_file(result_file: Path, rank: int) -> Path:
    return result_file.with_name(f"{result_file.name}.rank-{rank}")


def write_atomically(path: Path, obj: object) -> None:
    """Pickle `obj` to `path` so that a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def _open_sink(job: Job, result_file: Path, world: int) -> MlflowSink:
    """Rank 0's sink, writing to the trial's run (MLflow is imported here: the other ranks never load it)."""
    import logging

    from mlflow import MlflowClient

    from batchscope.sweeps.tracking import MlflowSink
    from batchscope.sweeps.worker import ProgressThrottle

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = MlflowClient(job.tracking_uri)
    return MlflowSink(
        client,
        job.run_id,
        on_metrics=ProgressThrottle(lambda step, loss: write_atomically(progress_file(result_file), (step, loss))),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: torchrun ... -m batchscope.sweeps.ddp_entry JOB_FILE RESULT_FILE", file=sys.stderr)
        return 2
    job_file, result_file = Path(args[0]), Path(args[1])

    from batchscope.sweeps import faults
    from batchscope.sweeps.worker import die_with_parent
    from batchscope.trainers import distributed
    from batchscope.trainers.loop import train

    die_with_parent()  # torchrun starts each rank in its own session: if torchrun dies, so does the rank
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the sweep, which stops the trial
    with open(job_file, "rb") as f:
        job: Job = pickle.load(f)
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    sink: MlflowSink | None = None
    try:
        device = distributed.init_from_env(job.spec.device)
        spec = replace(job.spec, device=str(device))
        run_sink: Any = None
        if is_main:
            sink = run_sink = _open_sink(job, result_file, distributed.world())
        fault = faults.for_trial(job.trial_number)
        if fault is not None and fault.kind == "nan":
            spec = replace(spec, lr=1e12, optimizer="sgd")  # a real divergence
        elif fault is not None and sink is not None:
            run_sink = faults.FaultySink(sink, fault)
        stop = stop_file(result_file)
        result = train(spec, run_sink, should_stop=stop.exists, checkpoint=job.checkpoint)
        if sink is not None:
            sink.close()
        if is_main:
            write_atomically(result_file, ("done", result))
        distributed.shutdown()
        return 0
    except Exception as exc:
        # No orderly shutdown: the other ranks may wait in a collective; torchrun ends them when this exits.
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.close(timeout=30)
        text = str(exc).splitlines()[0] if str(exc) else ""
        error = ("error", f"{type(exc).__name__}: {text}", traceback.format_exc())
        write_atomically(result_file if is_main else rank_error_file(result_file, rank), error)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""One trial in several processes: the module that torchrun starts on every rank.

    python -m torch.distributed.run --standalone --nproc_per_node N -m batchscope.sweeps.ddp_entry JOB_FILE RESULT_FILE

The sweep's worker process (sweeps/ddp_launch.py) pickles the trial's `Job` to JOB_FILE,
starts torchrun and waits. Every rank joins the process group and trains
(`batchscope.trainers.loop.train`, data parallel); rank 0 alone logs to the trial's MLflow run
and writes the outcome to RESULT_FILE; the files beside it are described in sweeps/ddp_files.py.

Such trials are not pruned: Optuna lives in the sweep process, and rank 0's sink
never asks the run to stop.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from batchscope.sweeps.ddp_files import progress_file, rank_error_file, stop_file, write_atomically
from batchscope.sweeps.job import error_outcome

if TYPE_CHECKING:
    from batchscope.sweeps.job import Job
    from batchscope.sweeps.tracking import MlflowSink


def _open_sink(job: Job, result_file: Path) -> MlflowSink:
    """Rank 0's sink, writing to the trial's run (MLflow is imported here: the other ranks never load it)."""
    import logging

    from mlflow import MlflowClient

    from batchscope.sweeps.child import ProgressThrottle
    from batchscope.sweeps.tracking import MlflowSink

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
    from batchscope.sweeps.child import die_with_parent
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
        if is_main:
            sink = _open_sink(job, result_file)
        spec, run_sink = faults.inject(replace(job.spec, device=str(device)), sink, job.trial_number)
        result = train(spec, run_sink, should_stop=stop_file(result_file).exists, checkpoint=job.checkpoint)
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
        write_atomically(result_file if is_main else rank_error_file(result_file, rank), error_outcome(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())

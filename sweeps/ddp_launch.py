"""The worker's side of a data-parallel trial: start torchrun, relay its progress, collect its outcome.

A job with `nproc > 1` is trained by torchrun's ranks (sweeps/ddp_entry.py), not in the worker;
the worker waits here and answers the sweep as for any trial. The two sides talk through the
files of sweeps/ddp_files.py.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from batchscope.sweeps import ddp_files
from batchscope.sweeps.child import parent_death_signal
from batchscope.sweeps.job import Job, Outcome

# After a stop request, how long a torchrun trial gets to stop at its next logging point.
_STOP_GRACE_S = 30.0


def run_distributed(job: Job, conn: Connection, stop: Any, parent_pid: int) -> Outcome:
    """Run `job` under torchrun in `job.nproc` processes; the ("done", ...) or ("error", ...) message."""
    with tempfile.TemporaryDirectory(prefix="batchscope-ddp-") as tmp:
        job_file, result_file, log_file = Path(tmp, "job.pkl"), Path(tmp, "result.pkl"), Path(tmp, "torchrun.log")
        with open(job_file, "wb") as f:
            pickle.dump(job, f)
        proc = _start_torchrun(job.nproc, job_file, result_file, log_file)
        progress = _ProgressRelay(ddp_files.progress_file(result_file), conn)
        stop_asked: float | None = None
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                if os.getppid() != parent_pid:
                    return ("error", "the sweep process is gone", "")
                if stop.is_set() and stop_asked is None:
                    ddp_files.stop_file(result_file).touch()  # rank 0 stops every rank at the next logging point
                    stop_asked = time.monotonic()
                if stop_asked is not None and time.monotonic() - stop_asked > _STOP_GRACE_S:
                    _end_process_group(proc)
                progress.relay()
        finally:
            _end_process_group(proc)
        outcome = ddp_files.read_outcome(result_file, job.nproc)
        if outcome is not None:
            return outcome
        log_tail = log_file.read_text(errors="replace")[-8000:]
        return ("error", f"torchrun exited with code {proc.returncode} before any rank wrote a result", log_tail)


def _start_torchrun(nproc: int, job_file: Path, result_file: Path, log_file: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc_per_node",
        str(nproc),
        "-m",
        "batchscope.sweeps.ddp_entry",
        str(job_file),
        str(result_file),
    ]
    with open(log_file, "wb") as log:
        # Its own process group, to end torchrun with all it started; and it dies with this worker.
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )


class _ProgressRelay:
    """Sends rank 0's latest training loss (kept in a file) to the sweep process when it changes."""

    def __init__(self, path: Path, conn: Connection) -> None:
        self._path = path
        self._conn = conn
        self._step = -1

    def relay(self) -> None:
        latest = ddp_files.read(self._path)
        if latest is None:
            return
        step, loss = latest
        if step != self._step:
            self._step = step
            self._conn.send(("step", step, loss))


def _end_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop torchrun (it stops its ranks on SIGTERM; they die with it in any case)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

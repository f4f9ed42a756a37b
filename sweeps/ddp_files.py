"""The files through which a trial's worker and its torchrun ranks talk (one folder per trial).

The worker pickles the trial's `Job` to JOB_FILE and starts torchrun (sweeps/ddp_launch.py);
every rank reads it (sweeps/ddp_entry.py). Rank 0 writes the outcome to RESULT_FILE:
("done", TrainResult) or ("error", message, traceback). Files beside RESULT_FILE carry the
rest: the worker creates `RESULT_FILE.stop` to stop the run at its next logging point, rank 0
keeps the latest training loss in `RESULT_FILE.progress` for the sweep's progress display,
and another rank that fails writes its error record to `RESULT_FILE.rank-N` (torchrun may end
rank 0 before it has written its own).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any


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


def read(path: Path) -> Any:
    """What `write_atomically` wrote to `path`; None if it has not been written (or cannot be read)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def read_outcome(result_file: Path, nproc: int) -> tuple[Any, ...] | None:
    """Rank 0's outcome; else the first error another rank recorded (torchrun may have ended rank 0 first)."""
    for record in [result_file, *(rank_error_file(result_file, r) for r in range(1, nproc))]:
        outcome = read(record)
        if outcome is not None:
            return tuple(outcome)
    return None

"""What the sweep hands a trial's process, and the outcome it gets back.

A `Job` goes to the trial worker through its pipe (sweeps/worker.py), or to every torchrun
rank through a pickled file (sweeps/ddp_files.py). Whichever process trains answers with
one outcome: ("done", TrainResult) or ("error", message, traceback).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchscope.trainers.spec import TrainSpec

if TYPE_CHECKING:  # importing torch here would delay spawning the worker, which imports it anyway
    from batchscope.trainers.checkpoint import CheckpointPolicy


@dataclass(frozen=True)
class Job:
    spec: TrainSpec
    run_id: str
    tracking_uri: str
    trial_number: int
    checkpoint: CheckpointPolicy | None = None
    # Processes training this trial together (torchrun, data parallel); 1 trains in the worker itself.
    nproc: int = 1
    # CPU trials: the cap on the worker's memory above its start-up size (sweeps.memcap); None: none.
    memory_limit_mb: float | None = None


def error_outcome(exc: BaseException) -> tuple[str, str, str]:
    """A trial's ("error", one line, traceback) outcome; call it inside the `except` that caught `exc`."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return ("error", f"{type(exc).__name__}: {text}", traceback.format_exc())


Outcome = tuple[Any, ...]

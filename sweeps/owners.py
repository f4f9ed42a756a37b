"""Which process runs a trial, and whether it is still alive.

A trial records its worker (`host:pid`) when it is created; a sweep that finds a RUNNING
trial whose worker is gone fails it and re-runs it (sweeps.recovery), and `batchscope doctor`
does the same by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from batchscope.sweeps import optuna_attrs as attrs

# How long a RUNNING trial that names no worker yet counts as alive: the window between
# claiming a queued trial and recording its owner (new trials are created with theirs).
UNOWNED_GRACE_S = 60.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_alive(worker: str | None, started: datetime.datetime | None = None) -> bool:
    """A trial's worker on this machine is alive if its process is; other hosts are trusted (heartbeat).

    A trial with no worker yet was claimed a moment ago by someone, or by a process killed right
    after claiming it: give it a minute before calling it dead, whatever the storage (another
    sweep on the same journal would otherwise fail a live trial).
    """
    if not worker or ":" not in worker:
        if started is None:
            return False
        now = datetime.datetime.now(started.tzinfo) if started.tzinfo else datetime.datetime.now()
        return bool(now - started < datetime.timedelta(seconds=UNOWNED_GRACE_S))
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def ask_owned(study: optuna.Study, storage: optuna.storages.BaseStorage, owner: Mapping[str, Any]) -> optuna.Trial:
    """`study.ask()`, with the trial's owner (`worker`, `sampler_seed`) written with the trial.

    `study.ask()` creates the trial and a later `set_user_attr` names its worker; between the
    two writes another sweep on the same study saw a RUNNING trial with no live worker and
    failed it (1 pair in 13). A new trial is created here with its owner in the same write;
    a queued one (a retry) is claimed atomically and named at once, and `worker_alive` gives
    an unnamed trial a grace period for the moment in between.
    """
    # Study.ask() drops the study's trial cache so that the sampler sees every trial so far.
    local = getattr(study, "_thread_local", None)
    if local is not None and hasattr(local, "cached_all_trials"):
        local.cached_all_trials = None
    study_id = storage.get_study_id_from_name(study.study_name)
    for waiting in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        for key, value in owner.items():
            storage.set_trial_user_attr(waiting._trial_id, key, value)
        return optuna.Trial(study, waiting._trial_id)
    template = FrozenTrial(
        number=-1,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(datetime.timezone.utc),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs=dict(owner),
        system_attrs={},
        intermediate_values={},
        trial_id=-1,
    )
    return optuna.Trial(study, storage.create_new_trial(study_id, template_trial=template))


# The reason of a trial that gave way before it ran: it has, and needs, no MLflow run.
NOT_RUN = "not run:"


def give_way(study: optuna.Study, trial: optuna.Trial, total: int) -> bool:
    """Workers on other machines may ask at the same moment: the later trial gives way.

    True (and the trial failed, a retry queued again) when `total` trials are already finished or
    running ahead of this one.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=states)
    ahead = sum(1 for t in trials if t.state != TrialState.RUNNING or t.number < trial.number)
    if ahead < total:
        return False
    trial.set_user_attr(attrs.STATUS, "failed")
    trial.set_user_attr(attrs.REASON, f"{NOT_RUN} other workers had already started the study's last trials")
    if attrs.RETRY_OF in trial.user_attrs:  # keep a retry queued for whoever needs it next
        study.enqueue_trial(dict(trial.params), user_attrs={attrs.RETRY_OF: trial.user_attrs[attrs.RETRY_OF]})
    study.tell(trial, state=TrialState.FAIL)
    return True


@contextlib.contextmanager
def sampling_lock(storage: optuna.storages.BaseStorage, storage_url: str, study_name: str) -> Iterator[None]:
    """One trial created and sampled at a time across the processes sharing a study.

    A sampler decides from the trials it sees; two workers that ask at the same moment both see
    the other's new trial without parameters yet, and propose the same point (two `batchscope
    worker` processes on one PostgreSQL frontier study trained (256, 0.229) twice). The slots of
    one process are serialised by the sweep's own lock; this covers other processes: a
    PostgreSQL advisory lock or MySQL's GET_LOCK for a database study, a file lock beside a
    local journal. Held for the few milliseconds of ask and suggest, never while training.
    Redis journals and SQLite files are left as Optuna handles them.
    """
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    engine = getattr(backend, "engine", None)
    if engine is not None and engine.dialect.name in ("postgresql", "mysql"):
        with database_lock(engine, f"batchscope-sample:{study_name}"):
            yield
        return
    if "://" not in storage_url:  # the local journal file
        with open(Path(f"{storage_url}.sample.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            yield
        return
    yield


@contextlib.contextmanager
def database_lock(engine: Any, name: str) -> Iterator[None]:
    """A lock named `name` that every process on this PostgreSQL or MySQL database shares."""
    from sqlalchemy import text

    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            key = zlib.crc32(name.encode()) - 2**31  # a signed 32-bit key for pg_advisory_lock
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:n, 60)"), {"n": name[:64]})
            try:
                yield
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name[:64]})

"""`batchscope doctor`'s checks of one study, and their repairs.

The tracking contract between its Optuna trials and its MLflow runs: no trial RUNNING for a
worker that is gone, no run RUNNING after its trial ended, trials and runs one to one, and no
study that MLflow knows but Optuna lost. Beside the sweep, no `batchscope train` run RUNNING
after its process stopped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps.doctor_finding import Finding
from batchscope.sweeps.doctor_mlflow import child_runs, close_run, running_train_runs, sweep_run_id, trial_number
from batchscope.sweeps.locations import redact
from batchscope.sweeps.owners import worker_alive
from batchscope.sweeps.store_setup import Stores

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class _Study:
    """A study's trials and runs, read once."""

    name: str
    storage: optuna.storages.BaseStorage
    study: optuna.Study
    trials: dict[int, FrozenTrial]
    experiment_id: str | None
    runs: list[Any]  # MLflow child runs (batchscope.role = trial), active ones
    parent_run_id: str | None
    runs_by_trial: dict[int, list[Any]] = field(default_factory=dict)


def check_study(name: str, storage: optuna.storages.BaseStorage | None, tracker: Any, stores: Stores) -> list[Finding]:
    """The findings about one study; `storage` or `tracker` is None when that store cannot be read."""
    where = f"study {name}"
    exp = tracker.client.get_experiment_by_name(name) if tracker is not None else None
    runs = child_runs(tracker.client, exp.experiment_id) if exp is not None else []
    # `batchscope train` runs are checked whether or not a sweep made the study.
    trains = _dead_train_runs(name, tracker, exp.experiment_id) if exp is not None else []
    known = [s.study_name for s in storage.get_all_studies()] if storage is not None else []
    if name not in known:
        if not runs:
            return trains
        lost = Finding(
            where,
            f"MLflow holds {len(runs)} trial run(s) of it, but the Optuna storage {stores.storage_label} "
            "has no such study (its journal was emptied or replaced); restore the journal from a backup or "
            "a sidecar file, or sweep under a new study name",
        )
        return [lost, *trains]
    assert storage is not None
    study = optuna.load_study(study_name=name, storage=storage)
    s = _Study(
        name,
        storage,
        study,
        {t.number: t for t in study.get_trials(deepcopy=False)},
        exp.experiment_id if exp is not None else None,
        runs,
        sweep_run_id(tracker.client, exp.experiment_id) if exp is not None else None,
    )
    for run in runs:
        number = trial_number(run)
        if number is not None:
            s.runs_by_trial.setdefault(number, []).append(run)
    findings = _dead_trials(s, tracker) + _stray_runs(s, tracker) + _unlinked_trials(s, tracker) + trains
    linked = sum(1 for t in s.trials.values() if _linked_runs(t))
    if tracker is None and linked:
        findings.append(
            Finding(where, f"{linked} trial(s) refer to MLflow runs, but {redact(stores.tracking_uri)} cannot be read")
        )
    if not findings and tracker is not None:
        findings.append(
            Finding(where, f"{len(s.trials)} trial(s), {len(runs)} run(s): one to one, none left RUNNING", "ok")
        )
    return findings


# ---- trials whose worker is gone -------------------------------------------------------
def _dead_trials(s: _Study, tracker: Any) -> list[Finding]:
    findings = []
    for t in s.trials.values():
        if t.state != TrialState.RUNNING:
            continue
        worker = t.user_attrs.get(attrs.WORKER)
        if worker_alive(worker, t.datetime_start):
            continue
        again = " and queue it to run again with the same parameters" if _sampled(t) else ""
        findings.append(
            Finding(
                f"study {s.name}",
                f"trial {t.number} is RUNNING, but its worker {worker or '(none recorded)'} is not running",
                repair=f"fail it (as a resumed sweep would){again}; close its runs as KILLED",
                fix=functools.partial(_fail_dead_trial, s, t, tracker),
                touches=("journal", "mlflow") if tracker is not None else ("journal",),
            )
        )
    return findings


def _fail_dead_trial(s: _Study, t: FrozenTrial, tracker: Any) -> str:
    """What `Recovery._fail_and_requeue` does on resume, and its runs closed (`close_stale_runs`)."""
    from batchscope.sweeps.recovery import requeue, stopped_reason
    from batchscope.sweeps.tracking import REASON, STATUS, STUDY, TRIAL, trial_run_name

    storage = s.storage
    reason = stopped_reason(t, "its worker stopped")
    linked = _linked_runs(t)
    tagged = [r.info.run_id for r in s.runs_by_trial.get(t.number, [])]
    run_ids = linked + [rid for rid in tagged if rid not in linked]
    did = []
    if not run_ids and tracker is not None and s.experiment_id is not None and s.parent_run_id is not None:
        # Killed before creating its run: a closed one keeps trials and runs one to one.
        tags = {STUDY: s.name, TRIAL: str(t.number), STATUS: "failed"}
        name = trial_run_name(t.number, t.params)
        run_ids = [tracker.trial_run(s.experiment_id, s.parent_run_id, name, dict(t.params), tags)]
        did.append("recorded a closed run for it")
    if run_ids != linked:
        storage.set_trial_user_attr(t._trial_id, attrs.MLFLOW_RUN_IDS, run_ids)
        storage.set_trial_user_attr(t._trial_id, attrs.MLFLOW_RUN_ID, t.user_attrs.get(attrs.MLFLOW_RUN_ID, run_ids[0]))
        if any(rid not in linked for rid in tagged):
            did.append("linked its runs by their tags")
    storage.set_trial_user_attr(t._trial_id, attrs.STATUS, "failed")
    storage.set_trial_user_attr(t._trial_id, attrs.REASON, reason)
    if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
        return "another process ended it first"
    did.append("failed it")
    if _sampled(t):
        requeue(s.study, t)
        did.append("queued it again with the same parameters")
    if tracker is not None:
        for run_id in run_ids:
            if tracker.client.get_run(run_id).info.status == "RUNNING":
                tracker.end(run_id, "KILLED", tags={STATUS: "failed", REASON: reason})
                did.append(f"closed run {run_id} as KILLED")
    return "; ".join(did)


# ---- runs against trials ---------------------------------------------------------------
def _stray_runs(s: _Study, tracker: Any) -> list[Finding]:
    """Runs left RUNNING after their trial ended, and runs whose trial the study does not have."""
    findings = []
    for run in s.runs:
        run_id, number = run.info.run_id, trial_number(run)
        trial = s.trials.get(number) if number is not None else None
        if trial is None:
            findings.append(
                Finding(
                    f"study {s.name}",
                    f"run {run_id} says trial {number}, which the study does not have (lost with the journal?)",
                    repair="close it if RUNNING, and mark it deleted in MLflow (restorable: mlflow runs restore); "
                    "a new trial with that number would otherwise repeat it",
                    fix=functools.partial(_retire_run, tracker, run),
                    touches=("mlflow",),
                )
            )
        elif run.info.status == "RUNNING" and trial.state != TrialState.RUNNING:
            findings.append(
                _closable(
                    s.name,
                    f"run {run_id} of trial {number} is RUNNING, but its trial is {trial.state.name}",
                    tracker,
                    run,
                )
            )
        elif trial.state != TrialState.RUNNING and run_id not in _linked_runs(trial):
            findings.append(
                Finding(
                    f"study {s.name}",
                    f"run {run_id} has trial {number}'s tag, but the trial does not list it (an earlier attempt?)",
                    level="note",
                )
            )
    return findings


def _retire_run(tracker: Any, run: Any) -> str:
    from batchscope.sweeps.tracking import REASON

    if run.info.status == "RUNNING":
        close_run(tracker, run)
    tracker.client.set_tag(run.info.run_id, REASON, "its Optuna trial was lost; set aside by batchscope doctor")
    tracker.client.delete_run(run.info.run_id)
    return f"closed and marked deleted (mlflow runs restore --run-id {run.info.run_id} brings it back)"


def _unlinked_trials(s: _Study, tracker: Any) -> list[Finding]:
    """Finished trials without their MLflow run (RUNNING ones are linked when failed, above)."""
    if tracker is None:
        return []
    findings = []
    ids = {r.info.run_id for r in s.runs}
    for t in s.trials.values():
        if t.state not in FINISHED:
            continue
        linked = _linked_runs(t)
        tagged = s.runs_by_trial.get(t.number, [])
        if not linked and tagged:
            findings.append(
                Finding(
                    f"study {s.name}",
                    f"trial {t.number} lists no MLflow run; run {tagged[0].info.run_id} has its tag (reports find "
                    "it so; Optuna cannot change a finished trial)",
                    level="note",
                )
            )
        elif not linked:
            findings.append(Finding(f"study {s.name}", f"trial {t.number} ({t.state.name}) has no MLflow run"))
        elif missing := [rid for rid in linked if rid not in ids]:
            findings.append(
                Finding(
                    f"study {s.name}",
                    f"trial {t.number} refers to MLflow run(s) {', '.join(missing)}, which the experiment does "
                    "not hold (deleted, or another MLflow store?)",
                )
            )
    return findings


# ---- `batchscope train` runs -----------------------------------------------------------
def _dead_train_runs(name: str, tracker: Any, experiment_id: str) -> list[Finding]:
    """Train runs RUNNING whose process is gone (a `kill -9` leaves them so for good). Like a
    trial's worker, a process on another host is trusted; a run naming no process is only noted."""
    from batchscope.sweeps.tracking import WORKER

    findings = []
    for run in running_train_runs(tracker.client, experiment_id):
        run_id, worker = run.info.run_id, run.data.tags.get(WORKER)
        if not worker:
            findings.append(
                Finding(
                    f"study {name}",
                    f"train run {run_id} is RUNNING and names no process (made by an older batchscope): "
                    "whether it still runs cannot be told, so it is left as it is",
                    level="note",
                )
            )
        elif not worker_alive(worker, None):
            findings.append(
                _closable(name, f"train run {run_id} is RUNNING, but its process {worker} is not running", tracker, run)
            )
    return findings


def _linked_runs(t: FrozenTrial) -> list[str]:
    ids = t.user_attrs.get(attrs.MLFLOW_RUN_IDS)
    if ids:
        return [str(i) for i in ids]
    return [str(t.user_attrs[attrs.MLFLOW_RUN_ID])] if attrs.MLFLOW_RUN_ID in t.user_attrs else []


def _sampled(t: FrozenTrial) -> bool:
    from batchscope.sweeps import space

    return bool(space.sampled(t.params))


def _closable(study: str, problem: str, tracker: Any, run: Any) -> Finding:
    """A run left RUNNING that nothing will end: the repair closes it as KILLED."""
    return Finding(
        f"study {study}",
        problem,
        repair="close it as KILLED with a batchscope.reason",
        fix=functools.partial(close_run, tracker, run),
        touches=("mlflow",),
    )

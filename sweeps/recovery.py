"""Trials whose worker died: failed, their runs closed, and queued to re-run with the same parameters.

A sweep does this when it starts and before each trial it asks for (a peer may have died
since); `batchscope doctor --repair` does the same by hand (sweeps.doctor_study).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps import space
from batchscope.sweeps.owners import NOT_RUN, worker_alive
from batchscope.sweeps.tracking import REASON, STATUS, STUDY, TRIAL, Tracker, trial_run_name


def stopped_reason(t: FrozenTrial, what: str) -> str:
    if space.sampled(t.params):
        return f"{what} while this trial was running; re-run with the same parameters"
    return f"{what} before this trial's parameters were sampled; a new trial takes its place"


def requeue(study: optuna.Study, t: FrozenTrial) -> None:
    """Queue a stopped trial to re-run with its parameters; one stopped before sampling them has none."""
    if space.sampled(t.params):
        study.enqueue_trial(dict(t.params), user_attrs={attrs.RETRY_OF: t.number}, skip_if_exists=False)


def mark_stale(storage: optuna.storages.BaseStorage, study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's `failed_trial_callback`: called after it failed a trial whose heartbeat stopped."""
    storage.set_trial_user_attr(trial._trial_id, attrs.STATUS, "failed")
    reason = stopped_reason(trial, "its worker stopped sending heartbeats")
    storage.set_trial_user_attr(trial._trial_id, attrs.REASON, reason)
    requeue(study, trial)


@dataclass
class Recovery:
    """What a sweep needs to end a dead worker's trial: its study and its MLflow runs."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    # With a database storage, workers on other machines are checked by Optuna's heartbeat.
    heartbeat: bool

    def recover(self, *, close_runs: bool = False) -> int:
        """Fail trials whose worker died and queue them to re-run with the same parameters.

        Local workers are checked by process id; with a database storage, workers on
        other machines are checked by Optuna's heartbeat. Their MLflow runs end KILLED, and
        with `close_runs` (when a sweep starts) so does any trial run left RUNNING whose trial
        has ended (a sweep stopped by a full disk ended the trial but could not end its run).
        """
        recovered = 0
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # A peer may have just claimed a trial and not named itself yet: grace for one without a worker.
            if not worker_alive(t.user_attrs.get(attrs.WORKER), t.datetime_start) and self._fail_and_requeue(t):
                recovered += 1
        if self.heartbeat:
            # Optuna fails trials whose heartbeat stopped and calls mark_stale for each.
            recovered += len(optuna.storages.fail_stale_trials(self.study) or ())
        if close_runs:
            self._close_runless_trials()
        if recovered or close_runs:
            live = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            running = {rid for t in live for rid in t.user_attrs.get(attrs.MLFLOW_RUN_IDS, [])}
            # A live trial's newest run may not be recorded on it yet: its trial number keeps it.
            numbers = {str(t.number) for t in live}
            self.tracker.close_stale_runs(
                self.experiment_id, lambda run_id, number: run_id in running or number in numbers
            )
        return recovered

    def _fail_and_requeue(self, t: FrozenTrial) -> bool:
        """Mark a dead worker's trial failed; False if another process got there first."""
        reason = stopped_reason(t, "its worker stopped")
        try:
            if attrs.MLFLOW_RUN_ID not in t.user_attrs:
                # Killed between creating its MLflow run and recording it: find the run by its tags;
                # killed before creating one: record a closed run, so runs and trials stay one to one.
                run_ids = self.tracker.trial_run_ids(self.experiment_id, t.number) or [self._closed_run(t, reason)]
                self.storage.set_trial_user_attr(t._trial_id, attrs.MLFLOW_RUN_IDS, run_ids)
                self.storage.set_trial_user_attr(t._trial_id, attrs.MLFLOW_RUN_ID, run_ids[0])
            self.storage.set_trial_user_attr(t._trial_id, attrs.STATUS, "failed")
            self.storage.set_trial_user_attr(t._trial_id, attrs.REASON, reason)
            if not self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                return False
        except (UpdateFinishedTrialError, RuntimeError):
            return False
        requeue(self.study, t)
        return True

    def _close_runless_trials(self) -> None:
        """A trial that the sweep ended before its MLflow run existed (a disk that filled as the run
        was being created: the journal took the FAIL, the MLflow database not the run) gets a closed
        run, as a dead worker's does, so that runs and trials stay one to one. Trials that gave way
        to a peer were never run and keep none. Found by the run's tag, so never made twice."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if attrs.MLFLOW_RUN_ID in t.user_attrs or str(t.user_attrs.get(attrs.REASON, "")).startswith(NOT_RUN):
                continue
            if not self.tracker.trial_run_ids(self.experiment_id, t.number):
                self._closed_run(t, str(t.user_attrs.get(attrs.REASON) or "ended before its MLflow run was created"))

    def _closed_run(self, t: FrozenTrial, reason: str) -> str:
        run_id = self.tracker.trial_run(
            self.experiment_id,
            self.parent_run_id,
            trial_run_name(t.number, t.params),
            dict(t.params),
            {STUDY: self.study.study_name, TRIAL: str(t.number), STATUS: "failed"},
        )
        self.tracker.end(run_id, "KILLED", tags={STATUS: "failed", REASON: reason})
        return run_id

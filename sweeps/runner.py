"""The sweep: create or load the study, run trials until `n_trials` are done, track everything.

A trial is one sampled (batch size, lr); it trains once per seed, each seed a
child run in MLflow. Whatever way a trial ends, its runs are ended and its
Optuna state says so; running the same command again continues the study.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

import batchscope
from batchscope.sweeps import diskspace, frontier, memcap, memory, space
from batchscope.sweeps.config import SweepConfig, config_to_dict, torch_has_gpu_support
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.stores import (
    Stores,
    check_tracking,
    open_storage,
    quiet_experimental,
    quiet_libraries,
    redact,
    resolve,
    root_dir,
    safe_name,
)
from batchscope.sweeps.tracking import REASON, RUN_STATUS, SEED, STATUS, STUDY, TRIAL, Tracker, trial_run_name
from batchscope.sweeps.worker import Job, TrialError, TrialWorker, WorkerDied
from batchscope.trainers.recipes import get_recipe
from batchscope.trainers.spec import CheckpointPolicy, TrainResult, TrainSpec

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
FINGERPRINT_ATTR = "batchscope.fingerprint"
# A sweep whose trials keep crashing stops rather than burning through the budget.
MAX_CONSECUTIVE_CRASHES = 5


class Reporter(Protocol):
    """Progress display hooks; the CLI draws them with rich, tests pass `QuietReporter`."""

    def sweep_started(self, study: str, done: int, total: int) -> None: ...
    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None: ...
    def trial_step(self, number: int, step: int, loss: float | None) -> None: ...
    def trial_finished(self, number: int, status: str, values: list[float] | None, best: str | None) -> None: ...
    def message(self, text: str) -> None: ...


class QuietReporter:
    def sweep_started(self, study: str, done: int, total: int) -> None: ...
    def trial_started(self, number: int, params: Mapping[str, Any], seed: int, max_steps: int) -> None: ...
    def trial_step(self, number: int, step: int, loss: float | None) -> None: ...
    def trial_finished(self, number: int, status: str, values: list[float] | None, best: str | None) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class TrialOutcome:
    number: int
    status: str
    reason: str
    values: list[float] | None
    run_ids: list[str] = field(default_factory=list)


@dataclass
class SweepSummary:
    study: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    storage: str  # redacted
    outcomes: list[TrialOutcome]
    completed: int
    total: int


class TrialCrashed(Exception):
    """A trial raised something other than OOM or divergence."""


def git_commit(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# How long a RUNNING trial that names no worker yet counts as alive: the window between
# claiming a queued trial and recording its owner (new trials are created with theirs).
UNOWNED_GRACE_S = 60.0


def _worker_alive(worker: str | None, started: Any = None) -> bool:
    """A trial's worker on this machine is alive if its process is; other hosts are trusted (heartbeat).

    A trial with no worker yet was claimed a moment ago by someone, or by a process killed right
    after claiming it: give it a minute before calling it dead, whatever the storage (another
    sweep on the same journal would otherwise fail a live trial).
    """
    if not worker or ":" not in worker:
        if started is None:
            return False
        import datetime

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
    a queued one (a retry) is claimed atomically and named at once, and `_worker_alive` gives
    an unnamed trial a grace period for the moment in between.
    """
    import datetime

    from optuna.trial import FrozenTrial

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


class Sweep:
    """One study: its stores, its Optuna study, its MLflow experiment and parent run."""

    def __init__(
        self,
        cfg: SweepConfig,
        *,
        force: bool = False,
        stores: Stores | None = None,
        prestarted: list[TrialWorker] | None = None,
    ) -> None:
        self._prestarted = list(prestarted or [])
        quiet_libraries()
        self.cfg = cfg
        self.stores = stores or resolve(cfg.storage, cfg.tracking_uri)
        self.checkpoint_dir = root_dir() / "checkpoints" / safe_name(cfg.study)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.memory_limit_mb: float | None = None  # decided in run(), for the trials at a time
        try:
            self._open(force)
        except Exception as exc:
            if diskspace.is_disk_full(exc):
                raise diskspace.disk_full_error(self._local_stores() or {"a store": Path(".")}, None, 0) from None
            raise

    def _open(self, force: bool) -> None:
        """Open (or create) both stores, the study, its experiment and its parent run."""
        cfg = self.cfg
        # Remote stores are checked before anything local is created.
        check_tracking(self.stores, create=False)
        self.storage = open_storage(self.stores, heartbeat=cfg.heartbeat.model_dump())
        check_tracking(self.stores)
        storage = self.storage
        self._heartbeat = False
        if isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval is not None:
            self._heartbeat = True
            storage.failed_trial_callback = self._on_stale
        self.tracker = Tracker(self.stores.tracking_uri, self.stores.artifact_root)
        self.study = self._create_or_load(force)
        self.experiment_id = self.tracker.experiment_id(cfg.study)
        self.parent_run_id = self.tracker.sweep_run(
            self.experiment_id, cfg.study, self._sweep_params(), self._common_tags()
        )
        self.commit = git_commit()

    # ---- study ---------------------------------------------------------------
    def _create_or_load(self, force: bool) -> optuna.Study:
        cfg = self.cfg
        fp = space.fingerprint(cfg)
        dirs = space.directions(cfg.search)
        try:
            existing = optuna.load_study(study_name=cfg.study, storage=self.storage)
        except KeyError:
            existing = None
        if existing is not None:
            old = existing.user_attrs.get(FINGERPRINT_ATTR)
            old = space.comparable(old) if old is not None else None
            old_dirs = [d.name.lower() for d in existing.directions]
            if (old is not None and old != fp) or old_dirs != dirs:
                if not force:
                    what = (
                        space.describe_difference(old, fp) if old and old != fp else f"directions {old_dirs} → {dirs}"
                    )
                    raise UserError(
                        f"study {cfg.study!r} already exists with a different setup ({what}); "
                        f"use a new name (--set study={cfg.study}-2) or --force to continue it anyway"
                    )
                if old_dirs != dirs:
                    raise UserError(
                        f"study {cfg.study!r} optimizes {old_dirs}, not {dirs}; --force cannot change "
                        "the objective of an existing study: use a new study name"
                    )
        self.sampler_seed = space.sampler_seed(cfg.search)
        if existing is None and not force:
            self._refuse_lost_study()
        # `auto` batch sizes: measured once per study, then remembered with it.
        remembered = existing.user_attrs.get(memory.ATTR) if existing is not None else None
        cfg, self.max_micro, record = memory.resolve(cfg, remembered)
        self.cfg = cfg
        # Sample and epoch budgets need the training-set size: read once (for CIFAR-10 it reads
        # every training file), not for each trial's spec; the recipes give it without torch.
        self.num_train = budget_num_train(cfg)
        study = optuna.create_study(
            study_name=cfg.study,
            storage=self.storage,
            sampler=space.make_sampler(cfg.search, self.sampler_seed),
            pruner=space.make_pruner(cfg, self.num_train if cfg.train.max_epochs is not None else None),
            directions=dirs,  # type: ignore[arg-type]
            load_if_exists=True,
        )
        if record is not None and remembered is None:
            study.set_user_attr(memory.ATTR, record)
        names = list(cfg.search.objectives)
        if study.metric_names != names:  # optuna-dashboard and optuna.visualization label the objectives with these
            with quiet_experimental():
                study.set_metric_names(names)
        if study.user_attrs.get(FINGERPRINT_ATTR) != fp:
            study.set_user_attr(FINGERPRINT_ATTR, fp)
            study.set_user_attr("batchscope.config", config_to_dict(cfg) | {"storage": None, "tracking_uri": None})
        return study

    def _refuse_lost_study(self) -> None:
        """A new Optuna study whose MLflow experiment already holds trial runs: the study's storage
        was emptied or replaced (a journal cut to zero, another storage URL). Starting over would
        repeat trial numbers beside the old runs without a word."""
        from mlflow.entities.view_type import ViewType

        exp = self.tracker.client.get_experiment_by_name(self.cfg.study)
        if exp is None:
            return
        runs = self.tracker.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{TRIAL}` LIKE '%'", run_view_type=ViewType.ALL, max_results=1
        )
        if not runs:
            return
        known = optuna.get_all_study_summaries(self.storage, include_best_trial=False)
        if self.cfg.study not in {s.study_name for s in known}:
            # (Checked again: a peer starting at the same moment may have created it meanwhile.)
            raise UserError(
                f"study {self.cfg.study!r} is not in the Optuna storage {self.stores.storage_label}, but its "
                "MLflow experiment already has trial runs: the storage was emptied or replaced. Restore it, "
                f"run `batchscope doctor {self.cfg.study}`, use a new study name (--set study={self.cfg.study}-2), "
                "or --force to start a new study beside the old runs"
            )

    def _sweep_params(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "study": c.study,
            "trainer": c.trainer.recipe,
            "model": c.trainer.model,
            "sampler": c.search.sampler,
            "pruner": c.search.pruner,
            "n_trials": c.search.n_trials,
            "objective": ",".join(c.search.objectives),
            "batch_sizes": c.search.batch_choices(),
            "lr_space": c.search.lr.model_dump(),
            "seeds": c.train.seeds,
            "storage": self.stores.storage_label,
        }

    def _common_tags(self) -> dict[str, str]:
        tags = {STUDY: self.cfg.study, "batchscope.version": batchscope.__version__}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return tags

    def total_trials(self, n_trials: int | None = None) -> int:
        total = n_trials or self.cfg.search.n_trials
        grid = space.grid_size(self.cfg.search)
        return min(total, grid) if grid is not None else total

    def finished_count(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED_STATES))

    # ---- recovery --------------------------------------------------------------
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
            if not _worker_alive(t.user_attrs.get("worker"), t.datetime_start) and self._fail_and_requeue(t):
                recovered += 1
        if self._heartbeat:
            # Optuna fails trials whose heartbeat stopped and calls _on_stale for each.
            recovered += len(optuna.storages.fail_stale_trials(self.study) or ())
        if recovered or close_runs:
            live = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            running = {rid for t in live for rid in t.user_attrs.get("mlflow_run_ids", [])}
            # A live trial's newest run may not be recorded on it yet: its trial number keeps it.
            numbers = {str(t.number) for t in live}
            self.tracker.close_stale_runs(
                self.experiment_id, lambda run_id, number: run_id in running or number in numbers
            )
        return recovered

    def _fail_and_requeue(self, t: optuna.trial.FrozenTrial) -> bool:
        """Mark a dead worker's trial failed; False if another process got there first."""
        reason = _stopped_reason(t, "its worker stopped")
        try:
            if "mlflow_run_id" not in t.user_attrs:
                # Killed between creating its MLflow run and recording it: find the run by its tags;
                # killed before creating one: record a closed run, so runs and trials stay one to one.
                run_ids = self.tracker.trial_run_ids(self.experiment_id, t.number) or [self._closed_run(t, reason)]
                self.storage.set_trial_user_attr(t._trial_id, "mlflow_run_ids", run_ids)
                self.storage.set_trial_user_attr(t._trial_id, "mlflow_run_id", run_ids[0])
            self.storage.set_trial_user_attr(t._trial_id, "status", "failed")
            self.storage.set_trial_user_attr(t._trial_id, "reason", reason)
            if not self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                return False
        except (UpdateFinishedTrialError, RuntimeError):
            return False
        self._requeue(self.study, t)
        return True

    @staticmethod
    def _requeue(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        """Queue a stopped trial to re-run with its parameters; one stopped before sampling them has none."""
        if space.sampled(t.params):
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number}, skip_if_exists=False)

    def _closed_run(self, t: optuna.trial.FrozenTrial, reason: str) -> str:
        run_id = self.tracker.trial_run(
            self.experiment_id,
            self.parent_run_id,
            trial_run_name(t.number, t.params),
            dict(t.params),
            {STUDY: self.cfg.study, TRIAL: str(t.number), STATUS: "failed"},
        )
        self.tracker.end(run_id, "KILLED", tags={STATUS: "failed", REASON: reason})
        return run_id

    def _on_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Called by Optuna after it failed a trial whose heartbeat stopped (a dead remote worker).
        self.storage.set_trial_user_attr(trial._trial_id, "status", "failed")
        reason = _stopped_reason(trial, "its worker stopped sending heartbeats")
        self.storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        self._requeue(study, trial)

    # ---- the loop ----------------------------------------------------------------
    def run(
        self,
        n_trials: int | None = None,
        reporter: Reporter | None = None,
        workers: int = 1,
        *,
        shared: bool = False,
    ) -> SweepSummary:
        """Run trials until the study has `n_trials` finished ones; `workers` trials at a time.

        Ctrl-C: the running trials are asked to stop at their next logging point and
        are marked failed (and queued to re-run on the next sweep); a second Ctrl-C
        kills them at once. Either way both stores are left consistent. `shared`: other
        processes (`batchscope worker`) work on the same study, so the sweep's parent run
        is closed only once the study is complete.
        """
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        reporter = reporter or QuietReporter()
        total = self.total_trials(n_trials)
        recovered = self.recover(close_runs=True)
        if recovered:
            reporter.message(f"{recovered} trial(s) left running by a stopped sweep will be re-run")
        reporter.sweep_started(self.cfg.study, self.finished_count(), total)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[TrialOutcome] = []
        self._errors: list[BaseException] = []
        self.memory_limit_mb = self._memory_cap(workers)
        slots = [*self._prestarted[:workers]]
        slots += [TrialWorker() for _ in range(workers - len(slots))]
        for extra in self._prestarted[workers:]:
            extra.close()
        self._prestarted = []
        self._slots = slots
        self._slot_done = [threading.Event() for _ in range(workers)]
        threads = [
            threading.Thread(target=self._slot_loop, args=(i, total, reporter), name=f"slot-{i}", daemon=True)
            for i in range(workers)
        ]
        status = "FINISHED"
        try:
            for t in threads:
                t.start()
            self._wait(threads)
        except KeyboardInterrupt:
            status = "KILLED"
            self._stopping.set()
            reporter.message("stopping: marking the running trial(s); Ctrl-C again to stop at once")
            for w in slots:
                w.request_stop()
            try:
                self._wait(threads)
            except KeyboardInterrupt:
                for w in slots:
                    w.kill()
                self._wait(threads)
            raise
        finally:
            for w in slots:
                w.close()
            if self._errors and status == "FINISHED":
                status = "FAILED"
            # A shared study is done at n_trials, or once stop_when said so and no peer's trial still runs.
            stopped = getattr(self, "_frontier_stop", None) is not None and not self.study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)
            )
            if not shared or (status == "FINISHED" and (self.finished_count() >= total or stopped)):
                try:
                    self.tracker.client.set_terminated(self.parent_run_id, status=status)
                except Exception as exc:
                    # The disk is full: the parent run stays RUNNING and is taken up again on resume.
                    if not diskspace.is_disk_full(exc):
                        raise
                    self._errors.append(self._disk_full_error(total))
        if self._errors:
            raise self._errors[0]
        return SweepSummary(
            self.cfg.study,
            self.experiment_id,
            self.parent_run_id,
            self.stores.tracking_uri,
            self.stores.storage_label,
            list(self._outcomes),
            self.finished_count(),
            total,
        )

    def _wait(self, threads: list[threading.Thread]) -> None:
        """Until every slot thread has finished; Ctrl-C (KeyboardInterrupt) can land at any moment.

        Not Thread.join(): on Python 3.9-3.11 a KeyboardInterrupt that interrupts join() can mark
        a running thread as stopped (cpython gh-90882), and the sweep then exited while a trial
        was still being marked failed, leaving it RUNNING. The slot threads set their own flags
        (a thread that a Ctrl-C kept from starting never will).
        """
        while not all(done.is_set() or t.ident is None for t, done in zip(threads, self._slot_done, strict=True)):
            time.sleep(0.05)

    def _local_stores(self) -> dict[str, Path]:
        """The stores (and checkpoints) kept on this machine's disks, by name."""
        paths: dict[str, Path] = {}
        if "://" not in self.stores.storage_url:
            paths["the Optuna journal"] = Path(self.stores.storage_url)
        if self.stores.tracking_uri.startswith("sqlite:///"):
            paths["the MLflow store"] = Path(self.stores.tracking_uri.removeprefix("sqlite:///"))
        if self.stores.artifact_root and self.stores.artifact_root.startswith("file://"):
            paths["MLflow's artifacts"] = Path(self.stores.artifact_root.removeprefix("file://"))
        if self.cfg.train.checkpoint.every_steps is not None or self.cfg.train.checkpoint.every_minutes is not None:
            paths["the checkpoints"] = self.checkpoint_dir
        return paths

    def _disk_full_error(self, total: int) -> UserError:
        where = self._local_stores()
        try:
            trials = len(self.study.get_trials(deepcopy=False))
            left = max(0, total - self.finished_count())
        except Exception:  # the storage itself may be what cannot be read now
            trials, left = 0, 0
        per_trial = diskspace.used_bytes(where.values()) / trials if trials and where else None
        return diskspace.disk_full_error(where or {"a store": Path(".")}, per_trial, left)

    def _memory_cap(self, workers: int) -> float | None:
        """Each CPU trial's memory cap in MB: `train.memory_limit_mb`, else a share of the memory
        available now split between the `workers` trials at a time (sweeps.memcap); none on a GPU."""
        return memory_cap(self.cfg, workers)

    def _slot_loop(self, slot: int, total: int, reporter: Reporter) -> None:
        consecutive_crashes = 0
        try:
            while not self._stopping.is_set():
                with self._lock:
                    self.recover()  # a peer that died mid-trial: its trial is re-run here
                    running = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                    if self.finished_count() + running >= total:
                        return
                    # search.stop_when: the frontier is known well enough (said once per sweep).
                    if (why := frontier.stop_reason(self.study, self.cfg.search)) is not None:
                        if getattr(self, "_frontier_stop", None) is None:
                            self._frontier_stop = why
                            reporter.message(f"{why}; no more trials started")
                        return
                    trial = ask_owned(
                        self.study, self.storage, {"worker": worker_id(), "sampler_seed": self.sampler_seed}
                    )
                    if self._surplus(trial, total):
                        return
                try:
                    outcome = self._run_trial(trial, slot, reporter)
                except UpdateFinishedTrialError:
                    # Judged dead and ended by another process (its runs were ended on the way out).
                    outcome = TrialOutcome(trial.number, "failed", "ended by another process", None)
                with self._lock:
                    self._outcomes.append(outcome)
                if outcome.status == "failed" and diskspace.full_paths(self._local_stores().values()):
                    # A full disk fails every trial after this one: stop now, with one line.
                    raise self._disk_full_error(total)
                consecutive_crashes = consecutive_crashes + 1 if outcome.status == "failed" else 0
                if consecutive_crashes >= MAX_CONSECUTIVE_CRASHES and not self._stopping.is_set():
                    raise UserError(
                        f"{consecutive_crashes} trials in a row failed; the last one: {outcome.reason}. "
                        "Fix the cause and run the same command again to continue the sweep"
                    )
        except BaseException as exc:
            self._errors.append(self._disk_full_error(total) if diskspace.is_disk_full(exc) else exc)
            self._stopping.set()
        finally:
            self._slot_done[slot].set()

    def _surplus(self, trial: optuna.Trial, total: int) -> bool:
        """Workers on other machines may ask at the same moment: the later trial gives way."""
        trials = self.study.get_trials(deepcopy=False, states=(*FINISHED_STATES, TrialState.RUNNING))
        ahead = sum(1 for t in trials if t.state != TrialState.RUNNING or t.number < trial.number)
        if ahead < total:
            return False
        trial.set_user_attr("status", "failed")
        trial.set_user_attr("reason", "not run: other workers had already started the study's last trials")
        if "retry_of" in trial.user_attrs:  # keep a retry queued for whoever needs it next
            self.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.user_attrs["retry_of"]})
        self.study.tell(trial, state=TrialState.FAIL)
        return True

    def _run_trial(self, trial: optuna.Trial, slot: int, reporter: Reporter) -> TrialOutcome:
        """Train one sampled configuration once per seed, then tell Optuna how it went."""
        params = space.suggest(trial, self.cfg.search)
        finals: list[Mapping[str, float]] = []
        run_ids: list[str] = []
        status, reason = "ok", ""
        try:
            # With a database storage, the heartbeat lets other workers see if this one dies.
            with get_heartbeat_thread(trial._trial_id, self.storage):
                for i, seed in enumerate(self.cfg.train.seeds):
                    result = self._train_seed(
                        trial, params, seed, slot, prune=(i == 0), reporter=reporter, run_ids=run_ids
                    )
                    if result.status != "ok":
                        status, reason = result.status, result.reason
                        break
                    finals.append(result.final)
                    reason = reason or result.reason
        except TrialCrashed as exc:
            status, reason = "failed", str(exc)
        except BaseException as exc:
            # (A full disk may refuse these writes too: then the next sweep's recover() does them.)
            with contextlib.suppress(Exception):
                self._tell(trial, TrialState.FAIL, None, "failed", "the sweep stopped during this trial")
                if not isinstance(exc, UpdateFinishedTrialError):
                    self.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            raise
        values: list[float] | None = None
        if status == "failed":
            if self._stopping.is_set():
                reason = "interrupted by the user (Ctrl-C); it re-runs when the sweep continues"
                self.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            elif diskspace.full_paths(self._local_stores().values()):
                reason = f"the disk is full ({reason}); it re-runs when the sweep continues"
                self.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})
            self._tell(trial, TrialState.FAIL, None, status, reason)
        elif status == "ok":
            values = space.objective_values(self.cfg.search, finals)
            self._record_finals(trial, finals)
            self._tell(trial, TrialState.COMPLETE, values, status, reason)
        else:
            # Pruned, diverged and out-of-memory trials count towards n_trials and tell the
            # sampler that this region is bad (a FAIL would be ignored by the sampler).
            self._tell(trial, TrialState.PRUNED, None, status, reason)
        self._keep_checkpoints(trial, status, values, run_ids, slot)
        self._log_sweep_progress()
        reporter.trial_finished(trial.number, status, values, self._best_text())
        return TrialOutcome(trial.number, status, reason, values, run_ids)

    def _record_finals(self, trial: optuna.Trial, finals: list[Mapping[str, float]]) -> None:
        # A few headline values on the Optuna trial too, for `batchscope status` and dashboards.
        for key in ("final/steps_to_target", "final/best_val_acc", "final/val_loss"):
            vals = [f[key] for f in finals if key in f]
            if vals:
                trial.set_user_attr(key.removeprefix("final/"), sum(vals) / len(vals))

    def _tell(
        self, trial: optuna.Trial, state: TrialState, values: list[float] | None, status: str, reason: str
    ) -> None:
        if values is not None and any(math.isnan(v) for v in values):
            state, values = TrialState.FAIL, None
        with self._lock:
            try:
                trial.set_user_attr("status", status)
                trial.set_user_attr("reason", redact(reason)[:2000])
                self.study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
            except UpdateFinishedTrialError:
                # Another process judged this trial dead and ended it (and queued its re-run); its
                # runs are ended here all the same, so nothing is left RUNNING.
                return
            except RuntimeError as exc:
                # GridSampler calls study.stop() once the grid is used up, which Optuna allows only inside
                # optimize(); the trial's state is stored before that, and n_trials is capped at the grid.
                if "stop" not in str(exc).lower():
                    raise

    def _log_sweep_progress(self) -> None:
        """The parent run's metrics, so that MLflow's runs table and charts show the sweep's state:
        trials finished (complete or pruned: what counts towards n_trials), of them complete, and the
        best objective so far (single objective)."""
        done = self.study.get_trials(deepcopy=False, states=FINISHED_STATES)
        values = {
            "sweep/trials_finished": float(len(done)),
            "sweep/trials_complete": float(sum(t.state == TrialState.COMPLETE for t in done)),
        }
        if len(self.study.directions) == 1:
            with contextlib.suppress(ValueError):  # no completed trial yet
                values[f"sweep/best_{self.cfg.search.objectives[0]}"] = float(self.study.best_value)
        with contextlib.suppress(Exception):  # a progress metric must never fail a trial
            self.tracker.log_sweep_progress(self.parent_run_id, len(done), values)

    def _best_text(self) -> str | None:
        if len(self.study.directions) != 1:
            n = len(self.study.best_trials) if self.study.get_trials(states=(TrialState.COMPLETE,)) else 0
            return f"{n} on the Pareto front" if n else None
        try:
            best = self.study.best_trial
        except ValueError:
            return None
        name = self.cfg.search.objectives[0]
        return f"{name}={best.value:.4g} (bs={best.params.get('batch_size')}, lr={best.params.get('lr'):.3g})"

    # ---- checkpoints -----------------------------------------------------------------
    def checkpoint_path(self, number: int, seed: int) -> Path:
        return self.checkpoint_dir / f"trial-{number}-seed-{seed}.pt"

    def _checkpoint_policy(self, trial: optuna.Trial, seed: int) -> CheckpointPolicy | None:
        c = self.cfg.train.checkpoint
        if c.every_steps is None and c.every_minutes is None:
            return None
        retry_of = trial.user_attrs.get("retry_of")
        resume = self.checkpoint_path(int(retry_of), seed) if retry_of is not None else None
        return CheckpointPolicy(
            self.checkpoint_path(trial.number, seed),
            every_steps=c.every_steps,
            every_seconds=c.every_minutes * 60 if c.every_minutes is not None else None,
            resume_from=resume,
        )

    def _keep_checkpoints(
        self, trial: optuna.Trial, status: str, values: list[float] | None, run_ids: list[str], slot: int
    ) -> None:
        """Apply `train.checkpoint.keep` once a trial has ended; log kept final weights to MLflow."""
        keep = self.cfg.train.checkpoint.keep
        seeds = self.cfg.train.seeds
        mine = [self.checkpoint_path(trial.number, s) for s in seeds]
        retry_of = trial.user_attrs.get("retry_of")
        if retry_of is not None:  # the checkpoint this trial resumed from is no longer needed
            for s in seeds:
                self.checkpoint_path(int(retry_of), s).unlink(missing_ok=True)
        if status == "failed" and self._stopping.is_set():
            return  # interrupted: its re-run resumes from these
        kept = status == "ok" and (keep == "all" or (keep == "best" and self._is_best(trial, values)))
        if kept:
            for path, run_id in zip(mine, run_ids, strict=False):
                self._log_weights(path, run_id, slot)
            if keep == "best":
                previous = self.study.user_attrs.get("batchscope.best_checkpoint_trial")
                if previous is not None and previous != trial.number:
                    for s in seeds:
                        self.checkpoint_path(int(previous), s).unlink(missing_ok=True)
                self.study.set_user_attr("batchscope.best_checkpoint_trial", trial.number)
            return
        for path in mine:
            path.unlink(missing_ok=True)

    def _is_best(self, trial: optuna.Trial, values: list[float] | None) -> bool:
        if values is None:
            return False
        if len(self.study.directions) > 1:
            return True  # every trial may be on the Pareto front
        previous = [
            t.value
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.number != trial.number and t.value is not None
        ]
        if not previous:
            return True
        if self.study.direction == optuna.study.StudyDirection.MINIMIZE:
            return values[0] <= min(previous)
        return values[0] >= max(previous)

    def _log_weights(self, checkpoint: Path, run_id: str, slot: int) -> None:
        """Log the final weights (`weights/model.pt`, a state_dict) from a kept checkpoint."""
        if not checkpoint.exists():
            return
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            try:
                # The slot's worker has torch loaded; importing it here would stall the sweep (seconds).
                self._slots[slot].export_weights(checkpoint, path)
            except (WorkerDied, RuntimeError):
                from batchscope.trainers.checkpoint import export_weights

                export_weights(checkpoint, path)
            self.tracker.client.log_artifact(run_id, str(path), artifact_path="weights")

    # ---- one seed of one trial ------------------------------------------------------
    def spec_for(self, params: Mapping[str, Any], seed: int, slot: int = 0) -> TrainSpec:
        spec = make_spec(
            self.cfg, int(params["batch_size"]), float(params["lr"]), seed, self.num_train, max_micro=self.max_micro
        )
        device = slot_device(self.cfg.device, slot)
        return replace(spec, device=device) if device != spec.device else spec

    def _eval_history(self, run_id: str) -> list[Mapping[str, float]]:
        by_step: dict[int, dict[str, float]] = {}
        for key in space.TAIL_METRICS:
            for m in self.tracker.client.get_metric_history(run_id, key):
                if m.step > 0:  # step 0 is the evaluation at initialization, not one of training's
                    by_step.setdefault(m.step, {})[key] = m.value
        return [by_step[step] for step in sorted(by_step)]

    def _train_seed(
        self,
        trial: optuna.Trial,
        params: Mapping[str, Any],
        seed: int,
        slot: int,
        *,
        prune: bool,
        reporter: Reporter,
        run_ids: list[str],
    ) -> TrainResult:
        spec = self.spec_for(params, seed, slot)
        run_id = self.tracker.trial_run(
            self.experiment_id,
            self.parent_run_id,
            trial_run_name(trial.number, params, seed if len(self.cfg.train.seeds) > 1 else None),
            run_params(spec, self.cfg) | {"memory_limit_mb": self.memory_limit_mb},
            {
                STUDY: self.cfg.study,
                TRIAL: str(trial.number),
                SEED: str(seed),
                STATUS: "running",
                **({"mlflow.source.git.commit": self.commit} if self.commit else {}),
                **(
                    {"batchscope.retry_of": str(trial.user_attrs["retry_of"])} if "retry_of" in trial.user_attrs else {}
                ),
            },
        )
        run_ids.append(run_id)
        trial.set_user_attr("mlflow_run_ids", list(run_ids))
        if len(run_ids) == 1:
            trial.set_user_attr("mlflow_run_id", run_id)
        prune_key = space.pruning_metric(self.cfg) if prune else None

        evals: list[Mapping[str, float]] = []  # for the val_loss / val_acc objectives (space.tail_means)

        def on_eval(step: int, values: Mapping[str, float]) -> bool:
            evals.append({k: values[k] for k in space.TAIL_METRICS if k in values})
            if prune_key is None or prune_key not in values:
                return True
            trial.report(values[prune_key], space.pruning_step(self.cfg.train, step, spec.batch_size))
            return not trial.should_prune()

        reporter.trial_started(trial.number, params, seed, spec.max_steps)
        job = Job(
            spec,
            run_id,
            self.stores.tracking_uri,
            trial.number,
            self._checkpoint_policy(trial, seed),
            nproc=self.cfg.train.distributed.nproc,
            memory_limit_mb=self.memory_limit_mb,
        )
        try:
            result = self._slots[slot].run(
                job, on_step=lambda step, loss: reporter.trial_step(trial.number, step, loss), on_eval=on_eval
            )
        except (WorkerDied, TrialError) as exc:
            reason = redact(str(exc))
            self.tracker.end(run_id, "FAILED", tags={STATUS: "failed", REASON: reason})
            raise TrialCrashed(reason) from exc
        except BaseException:
            self.tracker.end(run_id, "KILLED", tags={STATUS: "failed", REASON: "the sweep stopped during this trial"})
            raise
        if result.status == "failed":  # stopped on request (Ctrl-C)
            self.tracker.end(run_id, "KILLED", tags={STATUS: "failed", REASON: "interrupted by the user (Ctrl-C)"})
            raise TrialCrashed(result.reason)
        extra: dict[str, Any] = {
            k: result.resolved[k]
            for k in ("tokens_per_batch", "resumed_from_step", "batchnorm", "gns_every", "gns_window")
            if k in result.resolved
        }
        if extra:
            self.tracker.log_params(run_id, extra)
        if result.final:
            if not evals:  # a DDP trial: its evaluations reach the sweep only through MLflow
                evals = self._eval_history(run_id)
            result.final.update(space.tail_means(evals, self.cfg.search.objective_evals, result.final))
            self.tracker.log_final(run_id, result.steps, result.final)
        self.tracker.end(run_id, RUN_STATUS[result.status], tags={STATUS: result.status, REASON: result.reason})
        return result


def memory_cap(cfg: SweepConfig, trials_at_once: int) -> float | None:
    """A CPU trial's memory cap in MB: `train.memory_limit_mb`, else a share of the memory available
    now split between the trials at a time (sweeps.memcap); none on a GPU or under torchrun."""
    if cfg.train.distributed.nproc > 1:
        return None
    if cfg.train.memory_limit_mb is not None:
        return float(cfg.train.memory_limit_mb)
    device, _ = planned_device(cfg.device, cfg.precision)
    return memcap.default_cap_mb(trials_at_once) if device == "cpu" else None


def _stopped_reason(t: optuna.trial.FrozenTrial, what: str) -> str:
    if space.sampled(t.params):
        return f"{what} while this trial was running; re-run with the same parameters"
    return f"{what} before this trial's parameters were sampled; a new trial takes its place"


def slot_device(device: str, slot: int) -> str:
    """With several GPUs, parallel trial slots take one GPU each (cuda:0, cuda:1, ...)."""
    if device not in ("auto", "cuda") or not torch_has_gpu_support():
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return device
    return f"cuda:{slot % n}"


def make_spec(
    cfg: SweepConfig,
    batch_size: int,
    lr: float,
    seed: int,
    num_train: int | None = None,
    max_micro: int | None = None,
) -> TrainSpec:
    t = cfg.train
    if t.max_steps is None and (t.max_samples is not None or t.max_epochs is not None) and num_train is None:
        num_train = _num_train(cfg)
    fixed = t.micro_batch_size if isinstance(t.micro_batch_size, int) else None
    # `auto`: split only the batches larger than what fits (max_micro, measured by AutoBatch).
    limit = fixed if fixed is not None else max_micro
    micro = limit if limit is not None and limit < batch_size else None
    return TrainSpec(
        recipe=cfg.trainer.recipe,
        model=cfg.trainer.model,
        recipe_options=cfg.trainer.options,
        batch_size=batch_size,
        micro_batch_size=micro,
        lr=lr,
        optimizer=t.optimizer,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        max_steps=t.steps_for(batch_size, num_train or 1),
        eval_every=t.eval_every,
        log_every=t.log_every,
        log_every_step=t.log_every_step,
        schedule=t.schedule,
        lr_scaling=t.lr_scaling.rule,
        reference_batch=t.lr_scaling.reference_batch,
        warmup_steps=t.lr_scaling.warmup_steps,
        target_metric=t.target.metric if t.target else None,
        target_value=t.target.value if t.target else None,
        stop_at_target=bool(t.target and t.target.stop),
        seed=seed,
        device=cfg.device,
        precision=cfg.precision,
        compile=t.compile,
        gns=t.gns.enabled,
        gns_every=None if t.gns.every == "auto" else t.gns.every,
        gns_budget=t.gns.max_overhead,
        gns_window=None if t.gns.window == "auto" else t.gns.window,
        divergence_factor=t.divergence_factor,
        sharpness=t.sharpness.enabled,
        sharpness_iters=t.sharpness.iters,
        sharpness_tol=t.sharpness.tol,
    )


def budget_num_train(cfg: SweepConfig) -> int | None:
    """The training-set size when the budget is in samples or epochs (needed to count steps), else None."""
    t = cfg.train
    return _num_train(cfg) if t.max_steps is None and (t.max_samples or t.max_epochs) else None


def _num_train(cfg: SweepConfig) -> int:
    # Sample and epoch budgets need the training-set size; recipes know it without building the model.
    recipe = get_recipe(cfg.trainer.recipe)
    opts = recipe.options.model_validate(cfg.trainer.options)
    if recipe.num_train is not None:
        return int(recipe.num_train(opts))
    n = getattr(opts, "num_samples", None)
    split = getattr(opts, "train_split", 1.0)
    if not n:
        raise UserError(
            f"train.max_epochs/max_samples need the training-set size, which recipe {cfg.trainer.recipe!r} "
            "does not give (Recipe.num_train); use train.max_steps"
        )
    return int(n * split)


# trainers.device.resolve_precision on the CPU, where it needs no torch.
_CPU_PRECISION = {"auto": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def planned_device(device: str, precision: str) -> tuple[str, str]:
    """The device and precision a trial will train with, as the worker resolves them (trainers.device)."""
    if device in ("auto", "cpu") and precision in _CPU_PRECISION and not torch_has_gpu_support():
        return "cpu", _CPU_PRECISION[precision]
    from batchscope.trainers.device import resolve_device, resolve_precision

    resolved = resolve_device(device)
    return str(resolved), resolve_precision(precision, resolved)


def run_params(spec: TrainSpec, cfg: SweepConfig) -> dict[str, Any]:
    """The contract's child-run params that the sweep decides.

    What the trainer resolves (device, precision, micro-batch, accumulation steps, effective lr,
    world size) it logs itself through its sink before the first step (trainers.loop): guessed
    here, a DDP trial's micro-batch was logged as the whole batch while each process saw half.
    """
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec.recipe_options.items()))
    return {
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "optimizer": spec.optimizer,
        "momentum": spec.momentum,
        "weight_decay": spec.weight_decay,
        "seed": spec.seed,
        "trainer": spec.recipe,
        "model": spec.model,
        "dataset": f"{spec.recipe}({opts})" if opts else spec.recipe,
        "max_steps": spec.max_steps,
        "eval_every": spec.eval_every,
        "lr_scaling": spec.lr_scaling,
        "reference_batch": spec.reference_batch,
        "warmup_steps": spec.warmup_steps,
        "schedule": spec.schedule,
        "target": f"{spec.target_metric}={spec.target_value}" if spec.target_metric else None,
        "gns": spec.gns,
        # With the cadence chosen from timed steps (None here) the chosen one is logged at the end.
        "gns_every": spec.gns_every if spec.gns else None,
        "gns_max_overhead": spec.gns_budget if spec.gns and spec.gns_every is None else None,
        "divergence_factor": spec.divergence_factor,
    }

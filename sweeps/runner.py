"""The sweep: create or load the study, run trials until `n_trials` are done, track everything.

A trial is one sampled (batch size, lr); it trains once per seed, each seed a
child run in MLflow. Whatever way a trial ends, its runs are ended and its
Optuna state says so; running the same command again continues the study.

Opening the study is sweeps.study's; dead trials are sweeps.recovery's; checkpoints are
sweeps.checkpoints'; a trial trains in a worker process (sweeps.worker). What stays here is
the slot loop, one trial, and one seed of a trial.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from batchscope.sweeps import diskspace, frontier, space
from batchscope.sweeps import optuna_attrs as attrs
from batchscope.sweeps.checkpoints import Checkpoints, checkpoint_dir
from batchscope.sweeps.config import SweepConfig
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.job import Job
from batchscope.sweeps.locations import redact
from batchscope.sweeps.owners import ask_owned, give_way, sampling_lock, worker_id
from batchscope.sweeps.progress import QuietReporter, Reporter
from batchscope.sweeps.recovery import Recovery, mark_stale
from batchscope.sweeps.specs import make_spec, memory_cap, run_params, slot_device
from batchscope.sweeps.store_setup import Stores, check_tracking, open_storage, quiet_libraries, resolve
from batchscope.sweeps.study import git_commit, open_study, sweep_params, sweep_progress, sweep_tags
from batchscope.sweeps.tracking import REASON, RETRY_OF, RUN_STATUS, SEED, STATUS, STUDY, TRIAL, Tracker, trial_run_name
from batchscope.sweeps.worker import TrialError, TrialWorker, WorkerDied
from batchscope.trainers.spec import TrainResult, TrainSpec

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# A sweep whose trials keep crashing stops rather than burning through the budget.
MAX_CONSECUTIVE_CRASHES = 5


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
        """Open (or create) both stores, the study, its experiment and its parent run."""
        quiet_libraries()
        self.cfg = cfg  # `auto` batch sizes are resolved once the study is open
        self.stores = stores or resolve(cfg.storage, cfg.tracking_uri)
        self.checkpoint_dir = checkpoint_dir(cfg.study)
        self.memory_limit_mb: float | None = None  # decided in run(), for the trials at a time
        self._prestarted = list(prestarted or [])
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        # run()'s: the worker per slot, each slot's end, what the trials did, what stopped the sweep.
        self._slots: list[TrialWorker] = []
        self._slot_done: list[threading.Event] = []
        self._outcomes: list[TrialOutcome] = []
        self._errors: list[BaseException] = []
        self._frontier_stop: str | None = None
        with self._disk_full_in_one_line():
            # Remote stores are checked before anything local is created.
            check_tracking(self.stores, create=False)
            self.storage = open_storage(self.stores, heartbeat=cfg.heartbeat.model_dump())
            check_tracking(self.stores)
            heartbeat = False
            if isinstance(self.storage, optuna.storages.RDBStorage) and self.storage.heartbeat_interval is not None:
                heartbeat = True
                self.storage.failed_trial_callback = functools.partial(mark_stale, self.storage)
            self.tracker = Tracker(self.stores.tracking_uri, self.stores.artifact_root)
            opened = open_study(cfg, self.storage, self.tracker, self.stores.storage_label, force=force)
            self.study, self.cfg, self.sampler_seed = opened.study, opened.cfg, opened.sampler_seed
            self.max_micro, self.num_train = opened.max_micro, opened.num_train
            self.experiment_id = self.tracker.experiment_id(cfg.study)
            self.commit = git_commit()
            params, tags = sweep_params(self.cfg, self.stores.storage_label), sweep_tags(cfg.study, self.commit)
            self.parent_run_id = self.tracker.sweep_run(self.experiment_id, cfg.study, params, tags)
        self.recovery = Recovery(
            self.study, self.storage, self.tracker, self.experiment_id, self.parent_run_id, heartbeat
        )
        self.checkpoints = Checkpoints(
            self.cfg.train.checkpoint, list(self.cfg.train.seeds), self.checkpoint_dir, self.study, self.tracker
        )

    @contextlib.contextmanager
    def _disk_full_in_one_line(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if diskspace.is_disk_full(exc):
                raise diskspace.disk_full_error(self._local_stores() or {"a store": Path(".")}, None, 0) from None
            raise

    def total_trials(self, n_trials: int | None = None) -> int:
        total = n_trials or self.cfg.search.n_trials
        grid = space.grid_size(self.cfg.search)
        return min(total, grid) if grid is not None else total

    def finished_count(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED_STATES))

    def recover(self, *, close_runs: bool = False) -> int:
        """Fail the trials whose worker died and queue them to re-run (sweeps.recovery)."""
        return self.recovery.recover(close_runs=close_runs)

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
        self._outcomes = []
        self._errors = []
        self.memory_limit_mb = memory_cap(self.cfg, workers)
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
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            stopped = self._frontier_stop is not None and not running
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
        paths = self.stores.local_paths()
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
                        if self._frontier_stop is None:
                            self._frontier_stop = why
                            reporter.message(f"{why}; no more trials started")
                        return
                    # Created and sampled in one go, one process at a time: a slot or a peer that
                    # asked in between would see this trial without parameters and propose the same.
                    with sampling_lock(self.storage, self.stores.storage_url, self.cfg.study):
                        owner = {attrs.WORKER: worker_id(), attrs.SAMPLER_SEED: self.sampler_seed}
                        trial = ask_owned(self.study, self.storage, owner)
                        if give_way(self.study, trial, total):
                            return
                        params = space.suggest(trial, self.cfg.search)
                try:
                    outcome = self._run_trial(trial, params, slot, reporter)
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

    def _run_trial(self, trial: optuna.Trial, params: dict[str, Any], slot: int, reporter: Reporter) -> TrialOutcome:
        """Train one sampled configuration once per seed, then tell Optuna how it went."""
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
                    self.study.enqueue_trial(dict(trial.params), user_attrs={attrs.RETRY_OF: trial.number})
            raise
        values: list[float] | None = None
        if status == "failed":
            if self._stopping.is_set():
                reason = "interrupted by the user (Ctrl-C); it re-runs when the sweep continues"
                self.study.enqueue_trial(dict(trial.params), user_attrs={attrs.RETRY_OF: trial.number})
            elif diskspace.full_paths(self._local_stores().values()):
                reason = f"the disk is full ({reason}); it re-runs when the sweep continues"
                self.study.enqueue_trial(dict(trial.params), user_attrs={attrs.RETRY_OF: trial.number})
            self._tell(trial, TrialState.FAIL, None, status, reason)
        elif status == "ok":
            values = space.objective_values(self.cfg.search, finals)
            self._record_finals(trial, finals)
            self._tell(trial, TrialState.COMPLETE, values, status, reason)
        else:
            # Pruned, diverged and out-of-memory trials count towards n_trials and tell the
            # sampler that this region is bad (a FAIL would be ignored by the sampler).
            self._tell(trial, TrialState.PRUNED, None, status, reason)
        self.checkpoints.keep(
            trial, status, values, run_ids, interrupted=self._stopping.is_set(), export=self._slots[slot].export_weights
        )
        with contextlib.suppress(Exception):  # a progress metric must never fail a trial
            self.tracker.log_sweep_progress(self.parent_run_id, *sweep_progress(self.study, self.cfg.search))
        reporter.trial_finished(trial.number, status, values, self._best_text())
        return TrialOutcome(trial.number, status, reason, values, run_ids)

    def _record_finals(self, trial: optuna.Trial, finals: list[Mapping[str, float]]) -> None:
        # A few headline values on the Optuna trial too, for `batchscope status` and dashboards.
        for name in attrs.FINAL_SUMMARY:
            vals = [f[f"final/{name}"] for f in finals if f"final/{name}" in f]
            if vals:
                trial.set_user_attr(name, sum(vals) / len(vals))
        if "final/steps_to_target" in finals[0]:
            trial.set_user_attr(attrs.FIRST_SEED_STEPS, finals[0]["final/steps_to_target"])

    def _tell(
        self, trial: optuna.Trial, state: TrialState, values: list[float] | None, status: str, reason: str
    ) -> None:
        if values is not None and any(math.isnan(v) for v in values):
            state, values = TrialState.FAIL, None
        with self._lock:
            try:
                trial.set_user_attr(attrs.STATUS, status)
                trial.set_user_attr(attrs.REASON, redact(reason)[:2000])
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

    # ---- one seed of one trial ------------------------------------------------------
    def spec_for(self, params: Mapping[str, Any], seed: int, slot: int = 0) -> TrainSpec:
        searched = {name: params[name] for name in self.cfg.search.params}
        spec = make_spec(
            self.cfg,
            int(params["batch_size"]),
            float(params["lr"]),
            seed,
            self.num_train,
            max_micro=self.max_micro,
            searched=searched,
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
                **({RETRY_OF: str(trial.user_attrs[attrs.RETRY_OF])} if attrs.RETRY_OF in trial.user_attrs else {}),
            },
        )
        run_ids.append(run_id)
        trial.set_user_attr(attrs.MLFLOW_RUN_IDS, list(run_ids))
        if len(run_ids) == 1:
            trial.set_user_attr(attrs.MLFLOW_RUN_ID, run_id)
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
            self.checkpoints.policy(trial, seed),
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

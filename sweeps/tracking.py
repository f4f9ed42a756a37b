"""MLflow side of a sweep: one experiment per study, a parent run, a child run per trial and seed.

Metrics are buffered and written in batches by a background thread, so the
training loop never waits on the database (a plain `log_metric` per step runs at
a fraction of bare-loop speed).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.view_type import ViewType

from sweeps.stores import safe_name

ROLE = "batchscope.role"
STATUS = "batchscope.status"
REASON = "batchscope.reason"
SEED = "batchscope.seed"
STUDY = "optuna.study"
TRIAL = "optuna.trial_number"
# MLflow's run states for how a trial ended.
RUN_STATUS = {"ok": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "oom": "FAILED", "failed": "FAILED"}
_MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch request
_MAX_PARAM_LEN = 6000


class Tracker:
    """Thin wrapper over MlflowClient with the tracking contract's names."""

    def __init__(self, tracking_uri: str, artifact_root: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri)

    def experiment_id(self, study: str) -> str:
        exp = self.client.get_experiment_by_name(study)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return str(exp.experiment_id)
        location = None
        if self.artifact_root is not None:
            location = f"{self.artifact_root.rstrip('/')}/{safe_name(study)}"
        try:
            return str(self.client.create_experiment(study, artifact_location=location, tags={STUDY: study}))
        except Exception:
            # Another worker created it first.
            exp = self.client.get_experiment_by_name(study)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def sweep_run(self, experiment_id: str, study: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """The study's parent run: found again when a sweep resumes, created otherwise."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = 'sweep'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return str(run_id)
        run = self.client.create_run(
            experiment_id, run_name=f"sweep {study}", tags={ROLE: "sweep", STUDY: study, **tags}
        )
        self.client.log_batch(run.info.run_id, params=_params(params))
        return str(run.info.run_id)

    def trial_run(
        self,
        experiment_id: str,
        parent_id: str,
        name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> str:
        run = self.client.create_run(
            experiment_id,
            run_name=name,
            tags={ROLE: "trial", "mlflow.parentRunId": parent_id, **tags},
        )
        self.client.log_batch(run.info.run_id, params=_params(params))
        return str(run.info.run_id)

    def end(self, run_id: str, status: str, *, tags: Mapping[str, str] | None = None) -> None:
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, params=_params(params))

    def log_final(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])

    def trial_run_ids(self, experiment_id: str, trial_number: int) -> list[str]:
        """The child runs of one Optuna trial, oldest first (one per seed)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = 'trial' and tags.`{TRIAL}` = '{int(trial_number)}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
        )
        return [str(r.info.run_id) for r in runs]

    def close_stale_runs(self, experiment_id: str, is_alive: Callable[[str], bool]) -> int:
        """End child runs left RUNNING by a killed sweep (their trials are re-run)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = 'trial' and attributes.status = 'RUNNING'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10_000,
        )
        closed = 0
        for run in runs:
            if is_alive(run.info.run_id):
                continue
            self.end(
                run.info.run_id,
                "KILLED",
                tags={STATUS: "failed", REASON: "the sweep stopped while this trial was running"},
            )
            closed += 1
        return closed


class MlflowSink:
    """A trainers.Sink that batches metrics and writes them from a background thread.

    `on_eval` lets the sweep add pruning (return False to stop) and progress display.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        on_eval: Callable[[int, Mapping[str, float]], bool] | None = None,
        on_metrics: Callable[[int, Mapping[str, float]], None] | None = None,
        flush_every: int = 500,
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._on_eval = on_eval
        self._on_metrics = on_metrics
        self._flush_every = flush_every
        self._buffer: list[Metric] = []
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name=f"mlflow-writer-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- trainers.Sink ---------------------------------------------------------
    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        ts = _now_ms()
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in values.items())
        if self._on_metrics is not None:
            self._on_metrics(step, values)
        if len(self._buffer) >= self._flush_every:
            self.flush()

    def evaluated(self, step: int, values: Mapping[str, float]) -> bool:
        ts = _now_ms()
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in values.items())
        self.flush()
        return self._on_eval(step, values) if self._on_eval is not None else True

    # -- writing ---------------------------------------------------------------
    def flush(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing metrics to MLflow failed: {self._error}") from self._error
        if self._buffer:
            self._queue.put(self._buffer)
            self._buffer = []

    def close(self, timeout: float = 120.0) -> None:
        """Write everything still buffered and stop the writer thread."""
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._error is not None:
            raise RuntimeError(f"writing metrics to MLflow failed: {self._error}") from self._error

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            # Merge whatever else is already waiting into as few requests as possible.
            batch = item
            done = False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                batch.extend(more)
            try:
                for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
                    self._client.log_batch(self._run_id, metrics=batch[i : i + _MAX_METRICS_PER_BATCH])
            except BaseException as exc:  # surfaced on the training thread at the next flush
                self._error = exc
                return
            if done:
                return


def _params(params: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items() if v is not None]


def _now_ms() -> int:
    return int(time.time() * 1000)

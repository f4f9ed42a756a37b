"""MLflow side of a sweep: one experiment per study, a parent run, a child run per trial and seed.

Metrics are buffered and written in batches by a background thread, so the
training loop never waits on the database (a plain `log_metric` per step runs at
a fraction of bare-loop speed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.entities.view_type import ViewType

from batchscope.analysis.paths import safe_name
from batchscope.contract import (
    PARENT_RUN,
    REASON,
    RETRY_OF,
    ROLE,
    SEED,
    STATUS,
    STUDY,
    SWEEP_ROLE,
    TRIAL,
    TRIAL_ROLE,
    WORKER,
    sweep_run,
)
from batchscope.sweeps.sink import MetricTransport, MetricWriter, MlflowSink, Row, log_rows, now_ms, params_of

# The contract's tag names are defined in batchscope.contract and re-exported for the sweeps' modules.
__all__ = [
    "REASON",
    "RETRY_OF",
    "ROLE",
    "SEED",
    "STATUS",
    "STUDY",
    "TRIAL",
    "WORKER",
    "MetricTransport",
    "MetricWriter",
    "MlflowSink",
    "Row",
    "Tracker",
]

# MLflow 3 opens an experiment without this tag in its GenAI/traces view; a sweep's runs are
# classic model training, whose runs table and metric charts are the view its users expect.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow's run states for how a trial ended.
RUN_STATUS = {"ok": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "oom": "FAILED", "failed": "FAILED"}


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
            if EXPERIMENT_KIND[0] not in exp.tags:  # made by an earlier batchscope
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return str(exp.experiment_id)
        location = None
        if self.artifact_root is not None:
            location = f"{self.artifact_root.rstrip('/')}/{safe_name(study)}"
        try:
            tags = {STUDY: study, EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]}
            return str(self.client.create_experiment(study, artifact_location=location, tags=tags))
        except Exception:
            # Another worker created it first.
            exp = self.client.get_experiment_by_name(study)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def sweep_run(self, experiment_id: str, study: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """The study's parent run: found again when a sweep resumes, created otherwise."""
        found = sweep_run(self.client, experiment_id)
        if found is not None:
            run_id = found.info.run_id
            if found.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return str(run_id)
        run = self.client.create_run(
            experiment_id, run_name=f"sweep {study}", tags={ROLE: SWEEP_ROLE, STUDY: study, **tags}
        )
        self.client.log_batch(run.info.run_id, params=params_of(params))
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
            tags={ROLE: TRIAL_ROLE, PARENT_RUN: parent_id, **tags},
        )
        self.client.log_batch(run.info.run_id, params=params_of(params))
        return str(run.info.run_id)

    def log_sweep_progress(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        """The parent run's own metrics (trials finished, best objective so far), at step = trials finished."""
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now_ms(), step) for k, v in values.items()])

    def end(self, run_id: str, status: str, *, tags: Mapping[str, str] | None = None) -> None:
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, params=params_of(params))

    def log_final(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        now = now_ms()
        log_rows(self.client, run_id, [(k, float(v), now, step) for k, v in values.items()])

    def trial_run_ids(self, experiment_id: str, trial_number: int) -> list[str]:
        """The child runs of one Optuna trial, oldest first (one per seed)."""
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = '{TRIAL_ROLE}' and tags.`{TRIAL}` = '{int(trial_number)}'",
            run_view_type=ViewType.ACTIVE_ONLY,
            order_by=["attributes.start_time ASC"],
        )
        return [str(r.info.run_id) for r in runs]

    def close_stale_runs(self, experiment_id: str, is_alive: Callable[[str, str | None], bool]) -> int:
        """End child runs left RUNNING by a killed sweep (their trials are re-run).

        `is_alive(run_id, trial_number_tag)` says which runs still belong to a live trial.
        """
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE}` = '{TRIAL_ROLE}' and attributes.status = 'RUNNING'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=10_000,
        )
        closed = 0
        for run in runs:
            if is_alive(run.info.run_id, run.data.tags.get(TRIAL)):
                continue
            self.end(
                run.info.run_id,
                "KILLED",
                tags={STATUS: "failed", REASON: "the sweep stopped while this trial was running"},
            )
            closed += 1
        return closed


def trial_run_name(number: int, params: Mapping[str, Any], seed: int | None = None) -> str:
    """`bs=256 lr=0.518 #2`: what tells runs apart in MLflow's runs table, then the trial number."""
    parts = []
    if "batch_size" in params:
        parts.append(f"bs={params['batch_size']}")
    if isinstance(params.get("lr"), int | float):
        parts.append(f"lr={params['lr']:.3g}")
    name = " ".join([*parts, f"#{number}"])
    return name if seed is None else f"{name} seed {seed}"

"""The tracking contract's names (DESIGN.md): what the sweeps write to MLflow and the report reads.

Users query these names, so each has one home, here, shared by `batchscope.sweeps` (the writer)
and `batchscope.analysis` (the reader). No imports: any process may load it.
"""

from __future__ import annotations

from typing import Any

# ---- run tags ----
ROLE = "batchscope.role"  # "sweep" (the study's parent run), "trial", "train", "throughput", "report"
STATUS = "batchscope.status"  # ok, pruned, diverged, oom, failed
REASON = "batchscope.reason"
SEED = "batchscope.seed"
# The process (host:pid) that runs a `batchscope train` run: `batchscope doctor` closes it if that is gone.
WORKER = "batchscope.worker"
# On a re-run's runs: the number of the stopped trial it re-runs.
RETRY_OF = "batchscope.retry_of"
STUDY = "optuna.study"
TRIAL = "optuna.trial_number"
PARENT_RUN = "mlflow.parentRunId"

# ---- values of ROLE ----
SWEEP_ROLE = "sweep"
TRIAL_ROLE = "trial"


def sweep_run(client: Any, experiment_id: str) -> Any | None:
    """The study's parent run (an MLflow `Run`), or None: the oldest active run with role `sweep`.

    The sweep logs to this one and the report reads it; should a study ever hold two (two sweeps
    that started at the same moment), both pick the same one.
    """
    from mlflow.entities.view_type import ViewType

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE}` = '{SWEEP_ROLE}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None

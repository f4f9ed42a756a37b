"""Metrics on their way to MLflow: the sink's batching, timestamps and errors, and who imports MLflow."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from batchscope.sweeps.sink import MetricWriter, MlflowSink


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_everything_is_written_by_close_with_per_step_timestamps(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    client, uri, exp = mlflow_store
    run_id = client.create_run(exp).info.run_id
    writer = MetricWriter(uri)
    sink = MlflowSink(writer, run_id, flush_rows=25, flush_s=60.0)
    sink.series("train/loss", 1, [1.0, 0.9, 0.8, 0.7, 0.6])
    time.sleep(0.25)
    sink.series("train/loss", 6, [0.5, 0.4, 0.3, 0.2, 0.1])
    sink.metrics(10, {"lr": 0.1})
    assert sink.evaluated(10, {"val/loss": 0.42}) is True
    sink.close()
    losses = history(client, run_id, "train/loss")
    assert [s for s, _, _ in losses] == list(range(1, 11))
    assert [round(v, 6) for _, v, _ in losses] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    # The second window's steps are spread over the 250 ms it took, not stamped all at once.
    stamps = [ts for _, _, ts in losses[5:]]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 150
    assert history(client, run_id, "val/loss")[0][:2] == (10, 0.42)
    assert history(client, run_id, "lr")[0][:2] == (10, 0.1)
    writer.close()


def test_a_client_gets_its_own_writer(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    client, _, exp = mlflow_store
    run_id = client.create_run(exp).info.run_id
    sink = MlflowSink(client, run_id)
    sink.series("train/loss", 1, [float(i) for i in range(2500)])  # more than one log_batch request
    sink.close()
    assert len(history(client, run_id, "train/loss")) == 2500


def test_a_failed_write_is_reported_to_the_trial(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    _, uri, _ = mlflow_store
    writer = MetricWriter(uri)
    sink = MlflowSink(writer, "no-such-run", flush_rows=1)
    sink.metrics(1, {"train/loss": 1.0})  # handed to the writer at once (flush_rows=1)
    with pytest.raises(RuntimeError, match="writing metrics to MLflow failed"):
        writer.drain("no-such-run")
    with pytest.raises(RuntimeError, match="writing metrics to MLflow failed"):
        sink.metrics(2, {"train/loss": 0.5})
    writer.close()


def test_the_trial_worker_does_not_import_mlflow() -> None:
    # The worker trains and sends rows; the sweep process writes them (and pays for MLflow's imports).
    code = (
        "import sys; import batchscope.sweeps.worker, batchscope.sweeps.sink, batchscope.sweeps.faults; "
        "import batchscope.trainers.loop; "
        "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

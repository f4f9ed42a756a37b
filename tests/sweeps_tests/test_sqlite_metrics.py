"""Metric rows written straight into MLflow's SQLite tables (sweeps/sqlite_metrics.py) must be the
rows MLflow's own log_batch writes: the same tables, the same history and latest values through
MlflowClient, the same refusals."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from batchscope.sweeps.sink import MetricWriter, log_rows
from batchscope.sweeps.sqlite_metrics import SqliteMetricLog

NOW = int(time.time() * 1000)
# Batches as a sweep's sink sends them, and what MLflow must cope with besides: NaN and ±inf, a
# row repeated within a batch and across batches, steps out of order, a step logged again with a
# later timestamp, equal step and timestamp with another value, and an older step after a newer.
BATCHES: list[list[tuple[str, float, int, int]]] = [
    [("train/loss", 2.3, NOW, 1), ("train/loss", 2.1, NOW + 1, 2), ("lr", 0.1, NOW, 1), ("lr", 0.1, NOW, 1)],
    [("train/loss", math.nan, NOW + 2, 3), ("val/acc", 0.5, NOW + 2, 3), ("train/loss", 1.9, NOW + 1, 2)],
    [("train/loss", math.inf, NOW + 3, 4), ("val/acc", -math.inf, NOW + 3, 4), ("val/acc", 0.6, NOW + 3, 4)],
    [("train/loss", 1.5, NOW + 5, 4), ("train/loss", 1.7, NOW + 5, 4), ("val/acc", 0.9, NOW + 9, 2)],
    [("lr", 0.05, NOW + 9, 7), ("lr", 0.05, NOW + 9, 7), ("final/val_acc", 0.61, NOW + 10, 7)],
]


def _tables(uri: str, run_id: str) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as conn:
        return {
            table: sorted(
                conn.execute(f"SELECT key, value, timestamp, step, is_nan FROM {table} WHERE run_uuid = ?", (run_id,))
            )
            for table in ("metrics", "latest_metrics")
        }


def _seen_by_mlflow(client: MlflowClient, run_id: str) -> tuple[dict[str, float], dict[str, list[tuple]]]:
    run = client.get_run(run_id)
    histories = {
        key: sorted((m.step, m.timestamp, repr(m.value)) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }
    return {k: repr(v) for k, v in run.data.metrics.items()}, histories


def test_the_rows_are_those_mlflow_writes(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    client, uri, exp = mlflow_store
    by_mlflow, direct = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    fast = SqliteMetricLog.open(uri)
    assert fast is not None
    for rows in BATCHES:
        log_rows(client, by_mlflow, rows)
        fast.log(direct, rows)
    assert _tables(uri, direct) == _tables(uri, by_mlflow)
    assert _seen_by_mlflow(client, direct) == _seen_by_mlflow(client, by_mlflow)
    latest = dict(_seen_by_mlflow(client, direct)[0])
    # Latest = the largest (step, timestamp, value): (4, NOW+5, 1.7) over 1.5 and over (4, NOW+3, inf).
    assert latest["train/loss"] == "1.7" and latest["val/acc"] == "0.6"


def test_a_run_that_is_deleted_or_unknown_gets_nothing(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    client, uri, exp = mlflow_store
    run_id = client.create_run(exp).info.run_id
    fast = SqliteMetricLog.open(uri)
    assert fast is not None
    client.delete_run(run_id)
    with pytest.raises(RuntimeError, match="must be in the 'active' state"):
        fast.log(run_id, BATCHES[0])
    with pytest.raises(LookupError, match="not found"):
        fast.log("0" * 32, BATCHES[0])
    assert _tables(uri, run_id) == {"metrics": [], "latest_metrics": []}
    with pytest.raises(Exception, match="must be in the 'active' state"):
        log_rows(client, run_id, BATCHES[0])  # as MLflow refuses it


def test_only_mlflows_own_tables_in_a_plain_sqlite_file_are_written(tmp_path: Path) -> None:
    assert SqliteMetricLog.open("postgresql://u@h/db") is None
    assert SqliteMetricLog.open(f"sqlite:///{tmp_path / 'x.db'}?timeout=5") is None
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:  # a metrics table with a column MLflow's has not
        conn.execute("CREATE TABLE metrics (key TEXT, value FLOAT, timestamp BIGINT, run_uuid TEXT, step BIGINT)")
        conn.execute("CREATE TABLE latest_metrics (key TEXT, value FLOAT)")
    assert SqliteMetricLog.open(f"sqlite:///{other}") is None


def test_the_writer_sends_a_keys_first_rows_through_mlflow_then_writes_directly(
    mlflow_store: tuple[MlflowClient, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, uri, exp = mlflow_store
    run_ids = [client.create_run(exp).info.run_id for _ in range(2)]
    through_mlflow: list[list[str]] = []
    import batchscope.sweeps.sink as sink_module

    def spy(client_: MlflowClient, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
        through_mlflow.append(sorted({key for key, _, _, _ in rows}))
        log_rows(client_, run_id, rows)

    monkeypatch.setattr(sink_module, "log_rows", spy)
    writer = MetricWriter(uri)
    for run_id in run_ids:
        for rows in BATCHES:
            writer.submit(run_id, list(rows))
            writer.drain(run_id)
    writer.close()
    # Each batch with a key not seen before went through log_batch (which checks the name), once.
    assert through_mlflow == [["lr", "train/loss"], ["train/loss", "val/acc"], ["final/val_acc", "lr"]]
    reference = client.create_run(exp).info.run_id
    for rows in BATCHES:
        log_rows(client, reference, rows)
    for run_id in run_ids:
        assert _seen_by_mlflow(client, run_id) == _seen_by_mlflow(client, reference)


def test_a_bad_metric_name_is_refused_by_mlflow_not_written(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    client, uri, exp = mlflow_store
    run_id = client.create_run(exp).info.run_id
    writer = MetricWriter(uri)
    writer.submit(run_id, [("../escape", 1.0, NOW, 1)])
    with pytest.raises(RuntimeError, match="writing metrics to MLflow failed"):
        writer.drain(run_id)
    writer.close()
    assert _tables(uri, run_id) == {"metrics": [], "latest_metrics": []}


def test_mlflow_reads_what_a_sweep_wrote(mlflow_store: tuple[MlflowClient, str, str]) -> None:
    """Written directly while MLflow's own connection is open in the same process: both see all."""
    client, uri, exp = mlflow_store
    run_id = client.create_run(exp).info.run_id
    writer = MetricWriter(uri)
    steps = range(1, 2001)
    writer.submit(run_id, [("train/loss", 1.0 / s, NOW + s, s) for s in steps])
    writer.drain(run_id)
    writer.submit(run_id, [("train/loss", 0.5 / s, NOW + 3000 + s, s + 2000) for s in steps])
    writer.drain(run_id)
    writer.close()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, 4001))
    assert client.get_run(run_id).data.metrics["train/loss"] == pytest.approx(0.5 / 2000)

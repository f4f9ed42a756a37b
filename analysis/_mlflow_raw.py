"""The raw rows of one MLflow experiment, read in bulk, in one shape whatever the store.

Two readers fill `RawExperiment`: `read_sql` queries MLflow's tables directly (SQLite,
PostgreSQL, MySQL: a handful of queries however many runs), and `read_client` goes through
`MlflowClient` for tracking servers (one history call per run and metric key, in threads,
because the REST API has no public bulk history endpoint).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from batchscope.analysis._gc import paused_gc

FINAL_PREFIX = "final/"
# MLflow's SQL stores clamp ±inf to ±float max and store NaN as 0 with is_nan set.
_FLOAT_MAX = np.finfo(np.float64).max

RUN_COLUMNS = ["run_id", "run_status", "start_time", "end_time"]
KEY_VALUE_COLUMNS = ["run_id", "key", "value"]
METRIC_COLUMNS = ["run_id", "key", "step", "value", "timestamp"]


@dataclass(frozen=True)
class RawExperiment:
    """Rows of one experiment; frames are empty (with their columns) when it has no runs."""

    experiment_id: str | None
    runs: pd.DataFrame  # RUN_COLUMNS
    tags: pd.DataFrame  # KEY_VALUE_COLUMNS
    params: pd.DataFrame  # KEY_VALUE_COLUMNS
    finals: pd.DataFrame  # KEY_VALUE_COLUMNS, value float: the latest value of each final/*
    metrics: pd.DataFrame  # METRIC_COLUMNS: every logged value of every other key


def empty_experiment(experiment_id: str | None = None) -> RawExperiment:
    return RawExperiment(
        experiment_id=experiment_id,
        runs=pd.DataFrame(columns=RUN_COLUMNS),
        tags=pd.DataFrame(columns=KEY_VALUE_COLUMNS),
        params=pd.DataFrame(columns=KEY_VALUE_COLUMNS),
        finals=pd.DataFrame(columns=KEY_VALUE_COLUMNS),
        metrics=pd.DataFrame(columns=METRIC_COLUMNS),
    )


def _restore_special_floats(values: np.ndarray, is_nan: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=True)
    values[is_nan.astype(bool)] = np.nan  # stored as 0 with the flag set
    values[values >= _FLOAT_MAX] = np.inf
    values[values <= -_FLOAT_MAX] = -np.inf
    return values


# --- SQL tables -----------------------------------------------------------------------------

# {eid} is the experiment's integer id, formatted in after int() (see read_sql).
_ACTIVE = "r.experiment_id = {eid} AND r.lifecycle_stage = 'active'"
_SQL_RUNS = f"SELECT r.run_uuid, r.status, r.start_time, r.end_time FROM runs r WHERE {_ACTIVE}"
_SQL_KEY_VALUE = (
    f"SELECT x.run_uuid, x.key, x.value FROM {{table}} x JOIN runs r ON r.run_uuid = x.run_uuid WHERE {_ACTIVE}"
)
_SQL_FINALS = (
    "SELECT m.run_uuid, m.key, m.value, m.is_nan FROM latest_metrics m "
    f"JOIN runs r ON r.run_uuid = m.run_uuid WHERE {_ACTIVE} AND m.key LIKE 'final/%'"
)
_SQL_METRICS = (
    "SELECT m.run_uuid, m.key, m.step, m.value, m.timestamp, m.is_nan FROM metrics m "
    f"JOIN runs r ON r.run_uuid = m.run_uuid WHERE {_ACTIVE} AND m.key NOT LIKE 'final/%'"
)
_SQL_EXPERIMENT = "SELECT experiment_id FROM experiments WHERE name = :name AND lifecycle_stage = 'active'"


def _fetch_columns(cursor: Any, query: str, n_columns: int) -> list[np.ndarray]:
    """Run a query on a DB-API cursor and return its columns as object arrays."""
    cursor.execute(query)
    rows = cursor.fetchall()
    if not rows:
        return [np.empty(0, dtype=object) for _ in range(n_columns)]
    return [np.asarray(column, dtype=object) for column in zip(*rows, strict=True)]


def _categorical(values: np.ndarray) -> pd.Categorical:
    """pd.Categorical(values) for an object array of a few distinct strings repeated a million
    times, built from its codes: the same categories and codes, ~5x faster (pandas would first
    convert every value to its string dtype; here only the distinct ones are)."""
    if values.size == 0:
        return pd.Categorical(values)
    codes, uniques = pd.factorize(values, sort=True)
    return pd.Categorical.from_codes(codes, categories=pd.Index(uniques))


def read_sql(tracking_uri: str, experiment_name: str) -> RawExperiment:
    """Read one experiment from an MLflow SQL store in six queries, whatever its size."""
    path = sqlite_file(tracking_uri)
    if path is not None:
        # The local store: the standard library's driver, the one SQLAlchemy would use, without
        # SQLAlchemy's import (0.1-0.2 s of a report of a few seconds).
        import sqlite3

        connection = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
        try:
            found = connection.execute(_SQL_EXPERIMENT.replace(":name", "?"), (experiment_name,)).fetchall()
            if not found:
                return empty_experiment()
            experiment_id, columns = _fetch_experiment(connection.cursor(), found)
        finally:
            connection.close()
        return _raw_experiment(experiment_id, columns)

    import sqlalchemy as sa

    engine = sa.create_engine(tracking_uri)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(_SQL_EXPERIMENT), {"name": experiment_name}).fetchall()
            if not rows:
                return empty_experiment()
            experiment_id, columns = _fetch_experiment(conn.connection.cursor(), list(rows))
    finally:
        engine.dispose()
    return _raw_experiment(experiment_id, columns)


def sqlite_file(tracking_uri: str) -> str | None:
    """The database file of a plain `sqlite:///PATH` URI (relative or absolute, as SQLAlchemy reads
    it); None for any other URI, or one with options (`?...`), which goes through SQLAlchemy."""
    if not tracking_uri.startswith("sqlite:///") or "?" in tracking_uri:
        return None
    path = tracking_uri.removeprefix("sqlite:///")
    return path or None


def _fetch_experiment(cursor: Any, found: list[Any]) -> tuple[int, list[list[np.ndarray]]]:
    """The newest experiment of those `found` by name, and its five tables' rows as columns."""
    # Several workspaces may reuse a name; the newest experiment is the sweep's. The id
    # is an integer column: formatting int(id) into the SQL is safe and lets the bulk
    # queries run on the plain DB-API cursor (SQLAlchemy's Row objects cost seconds at
    # a million rows) without caring about each driver's parameter style.
    experiment_id = max(int(row[0]) for row in found)
    try:
        with paused_gc():
            columns = [
                _fetch_columns(cursor, _SQL_RUNS.format(eid=experiment_id), 4),
                _fetch_columns(cursor, _SQL_KEY_VALUE.format(table="tags", eid=experiment_id), 3),
                _fetch_columns(cursor, _SQL_KEY_VALUE.format(table="params", eid=experiment_id), 3),
                _fetch_columns(cursor, _SQL_FINALS.format(eid=experiment_id), 4),
                _fetch_columns(cursor, _SQL_METRICS.format(eid=experiment_id), 6),
            ]
    finally:
        cursor.close()
    return experiment_id, columns


def _raw_experiment(experiment_id: int, columns: list[list[np.ndarray]]) -> RawExperiment:
    runs, tags, params, finals, metrics = columns
    with paused_gc():
        metric_frame = pd.DataFrame(
            {
                "run_id": _categorical(metrics[0]),
                "key": _categorical(metrics[1]),
                "step": metrics[2].astype(np.int64),
                "value": _restore_special_floats(metrics[3], metrics[5]),
                "timestamp": metrics[4].astype(np.int64),
            }
        )
    return RawExperiment(
        experiment_id=str(experiment_id),
        runs=pd.DataFrame(dict(zip(RUN_COLUMNS, runs, strict=True))),
        tags=pd.DataFrame(dict(zip(KEY_VALUE_COLUMNS, tags, strict=True))),
        params=pd.DataFrame(dict(zip(KEY_VALUE_COLUMNS, params, strict=True))),
        finals=pd.DataFrame(
            {
                "run_id": finals[0],
                "key": finals[1],
                "value": _restore_special_floats(finals[2], finals[3]),
            }
        ),
        metrics=metric_frame,
    )


# --- MlflowClient (tracking servers) ----------------------------------------------------------


def read_client(tracking_uri: str, experiment_name: str, *, max_workers: int = 8) -> RawExperiment:
    """Read one experiment through MlflowClient: paged search_runs, then histories in threads."""
    from mlflow import MlflowClient
    from mlflow.entities import Run, ViewType

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return empty_experiment()
    experiment_id = experiment.experiment_id

    found: list[Run] = []
    page_token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id],
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=page_token,
        )
        found.extend(page)
        page_token = page.token
        if not page_token:
            break

    runs, tags, params, finals, history_keys = [], [], [], [], []
    for run in found:
        run_id = run.info.run_id
        runs.append((run_id, run.info.status, run.info.start_time, run.info.end_time))
        tags += [(run_id, k, v) for k, v in run.data.tags.items()]
        params += [(run_id, k, v) for k, v in run.data.params.items()]
        for key, value in run.data.metrics.items():
            if key.startswith(FINAL_PREFIX):
                finals.append((run_id, key, float(value)))
            else:
                history_keys.append((run_id, key))

    def history(run_key: tuple[str, str]) -> list[tuple[str, str, int, float, int]]:
        run_id, key = run_key
        return [(run_id, key, m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        metric_rows = [row for rows in pool.map(history, history_keys) for row in rows]

    return RawExperiment(
        experiment_id=str(experiment_id),
        runs=pd.DataFrame.from_records(runs, columns=RUN_COLUMNS),
        tags=pd.DataFrame.from_records(tags, columns=KEY_VALUE_COLUMNS),
        params=pd.DataFrame.from_records(params, columns=KEY_VALUE_COLUMNS),
        finals=pd.DataFrame.from_records(finals, columns=KEY_VALUE_COLUMNS),
        metrics=pd.DataFrame.from_records(metric_rows, columns=METRIC_COLUMNS),
    )

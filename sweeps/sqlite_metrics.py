"""Metric rows written into a local MLflow SQLite store the way MLflow's own `log_batch` writes them.

MLflow's SQLAlchemy store spends ~5 ms of Python per request and ~0.07 ms per row (ORM objects,
the latest-metrics merge): on a small model that is most of what tracking costs, and a run's last
rows are written while the trial waits (benchmarks/README.md, section 1). Here the same rows go
in with two `executemany` statements in one transaction, with MLflow's semantics:

- a row is stored as `sanitize_metric_value` stores it: NaN as 0 with `is_nan` set, ±inf as
  ±float max; a row equal to one already stored (the whole primary key) is skipped, as MLflow's
  duplicate handling skips it;
- `latest_metrics` keeps, per key, the row with the largest (step, timestamp, value), as
  `_update_latest_metrics_if_necessary` does;
- the run must exist and be active (`_check_run_is_active`).

Only where this cannot differ from MLflow: a plain `sqlite:///` store whose `metrics` and
`latest_metrics` tables are exactly those MLflow's migrations create for the versions this was
written against (any other schema, e.g. after an MLflow upgrade that changes them, goes through
MLflow), and only for metric keys MLflow has already accepted once in this process (a new key's
first rows go through `log_batch`, which validates the name). Tested against MLflow writing the
same rows (tests/sweeps_tests/test_sqlite_metrics.py).
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from batchscope.analysis._mlflow_raw import sqlite_file

if TYPE_CHECKING:  # sink imports this module when it first writes
    from batchscope.sweeps.sink import Row  # (key, value, timestamp in ms, step)

# The two tables as MLflow's migrations create them (whitespace and quotes aside); MLflow 2.x-3.x.
_SCHEMA = {
    "metrics": (
        'CREATE TABLE "metrics" ("key" VARCHAR(250) NOT NULL, value FLOAT NOT NULL, timestamp BIGINT NOT NULL, '
        "run_uuid VARCHAR(32) NOT NULL, step BIGINT DEFAULT '0' NOT NULL, is_nan BOOLEAN DEFAULT '0' NOT NULL, "
        'CONSTRAINT metric_pk PRIMARY KEY ("key", timestamp, step, run_uuid, value, is_nan), '
        "FOREIGN KEY(run_uuid) REFERENCES runs (run_uuid), CHECK (is_nan IN (0, 1)))"
    ),
    "latest_metrics": (
        'CREATE TABLE "latest_metrics" ("key" VARCHAR(250) NOT NULL, value FLOAT NOT NULL, timestamp BIGINT, '
        "step BIGINT NOT NULL, is_nan BOOLEAN NOT NULL, run_uuid VARCHAR(32) NOT NULL, "
        'CONSTRAINT latest_metric_pk PRIMARY KEY ("key", run_uuid), '
        "FOREIGN KEY(run_uuid) REFERENCES runs (run_uuid), CHECK (is_nan IN (0, 1)))"
    ),
}
_FLOAT_MAX = 1.7976931348623157e308

_INSERT = "INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)"
_LATEST = (
    "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value, timestamp = excluded.timestamp, "
    "step = excluded.step, is_nan = excluded.is_nan "
    "WHERE (excluded.step, excluded.timestamp, excluded.value) > "
    "(latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)"
)


def _normal(sql: str) -> str:
    """CREATE TABLE text with whitespace and the optional "IF NOT EXISTS" evened out."""
    sql = re.sub(r"\s+", " ", sql.replace("IF NOT EXISTS ", "")).strip()
    return re.sub(r"\( ", "(", re.sub(r" \)", ")", sql))


def sanitize(value: float) -> tuple[float, int]:
    """(value as stored, is_nan), as MLflow's SqlAlchemyStore.sanitize_metric_value."""
    if math.isnan(value):
        return 0.0, 1
    if math.isinf(value):
        return (_FLOAT_MAX if value > 0 else -_FLOAT_MAX), 0
    return value, 0


class SqliteMetricLog:
    """Writes rows of known keys into one MLflow SQLite store; `open` says whether it can."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self.accepted: set[str] = set()  # keys MLflow's log_batch has taken in this process

    @classmethod
    def open(cls, tracking_uri: str) -> SqliteMetricLog | None:
        """A writer for a plain sqlite:/// store with MLflow's known tables; None otherwise."""
        path = sqlite_file(tracking_uri)
        if path is None:
            return None
        try:
            conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            found = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
        except sqlite3.Error:
            return None
        if any(_normal(found.get(name) or "") != _normal(sql) for name, sql in _SCHEMA.items()):
            conn.close()
            return None  # not the tables this was written against: MLflow writes
        return cls(conn)

    def takes(self, rows: Iterable[Row]) -> bool:
        """Whether every row is of a key MLflow accepted before, with plain numbers."""
        return all(
            key in self.accepted and type(value) in (float, int) and type(timestamp) is int and type(step) is int
            for key, value, timestamp, step in rows
        )

    def log(self, run_id: str, rows: Sequence[Row]) -> None:
        """Write `rows` to the run in one transaction (nothing of it on an error)."""
        stored = []
        latest: dict[str, tuple[int, int, float, int]] = {}
        for key, value, timestamp, step in rows:
            clean, is_nan = sanitize(float(value))
            stored.append((key, clean, timestamp, run_id, step, is_nan))
            candidate = (step, timestamp, clean, is_nan)
            if key not in latest or candidate[:3] > latest[key][:3]:
                latest[key] = candidate
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")  # the write lock first, as MLflow's session takes it
        try:
            found = conn.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
            if found is None:
                raise LookupError(f"Run with id={run_id} not found")
            if found[0] != "active":
                raise RuntimeError(f"The run {run_id} must be in the 'active' state. Current state is {found[0]}.")
            conn.executemany(_INSERT, stored)
            conn.executemany(_LATEST, [(key, v, ts, step, nan, run_id) for key, (step, ts, v, nan) in latest.items()])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._conn.close()

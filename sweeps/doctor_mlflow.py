"""The MLflow store as `batchscope doctor` sees it: the SQLite file's health and a consistent copy
of it, the runs a check needs, and closing a run that was left RUNNING."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from batchscope.sweeps.doctor_finding import Finding

_MLFLOW_TABLES = {"alembic_version", "experiments", "runs", "metrics", "params", "tags"}
DOCTOR_REASON = "left RUNNING by a process that stopped; closed by batchscope doctor"


# ---- the SQLite file -------------------------------------------------------------------
def sqlite_health(db: Path) -> Finding:
    """SQLite's integrity check and MLflow's tables, read-only."""
    try:
        conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return Finding("MLflow", f"{db} cannot be opened: {exc}")
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if rows != ["ok"]:
            return Finding(
                "MLflow",
                f"{db} fails SQLite's integrity check: {'; '.join(rows[:3])}; restore it from a backup",
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = sorted(_MLFLOW_TABLES - tables)
        if missing:
            holds_runs = "runs" in tables and conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] > 0
            return Finding(
                "MLflow",
                f"{db} is not a whole MLflow store (no {', '.join(missing)}: made while the disk was full?)",
                repair="" if holds_runs else "move it into the backups; the next sweep makes a new one",
            )
        version = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.Error as exc:
        return Finding("MLflow", f"{db} cannot be read as an SQLite database: {exc}")
    finally:
        conn.close()
    head = _mlflow_schema_head()
    if head is not None and version != [head]:
        return Finding(
            "MLflow",
            f"{db} has MLflow schema {version or 'none'}, this MLflow expects {head}: "
            f"run `mlflow db upgrade sqlite:///{db}` (after a backup)",
        )
    return Finding("MLflow", f"{db}: integrity ok, MLflow schema {version[0] if version else '?'}", "ok")


def _mlflow_schema_head() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return str(_get_latest_schema_revision())
    except Exception:  # a private helper of MLflow's: without it, the version is not compared
        return None


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of an SQLite database (its WAL included), by SQLite's backup API."""
    try:
        src = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error:  # a damaged file: keep its bytes as they are
        shutil.copy2(source, target)


# ---- experiments and runs --------------------------------------------------------------
def mlflow_studies(client: Any) -> list[str]:
    """Experiments made by batchscope (their `optuna.study` tag)."""
    from batchscope.sweeps.tracking import STUDY

    return [e.name for e in _pages(lambda token: client.search_experiments(page_token=token)) if STUDY in e.tags]


def child_runs(client: Any, experiment_id: str) -> list[Any]:
    """A sweep's trial runs, active ones, oldest first."""
    from batchscope.contract import ROLE, TRIAL_ROLE

    return _runs(client, experiment_id, f"tags.`{ROLE}` = '{TRIAL_ROLE}'")


def running_train_runs(client: Any, experiment_id: str) -> list[Any]:
    """The runs of `batchscope train` still RUNNING, oldest first."""
    from batchscope.sweeps.tracking import ROLE

    return _runs(client, experiment_id, f"tags.`{ROLE}` = 'train' and attributes.status = 'RUNNING'")


def sweep_run_id(client: Any, experiment_id: str) -> str | None:
    from batchscope.contract import sweep_run

    run = sweep_run(client, experiment_id)
    return str(run.info.run_id) if run is not None else None


def trial_number(run: Any) -> int | None:
    from batchscope.sweeps.tracking import TRIAL

    try:
        return int(run.data.tags.get(TRIAL, ""))
    except ValueError:
        return None


def close_run(tracker: Any, run: Any) -> str:
    """End a run left RUNNING as KILLED, saying why; a run that never said how it ended failed."""
    from batchscope.sweeps.tracking import REASON, STATUS

    tags = {REASON: DOCTOR_REASON}
    if run.data.tags.get(STATUS) in (None, "", "running"):
        tags[STATUS] = "failed"
    tracker.end(run.info.run_id, "KILLED", tags=tags)
    return "closed as KILLED"


def _runs(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    from mlflow.entities.view_type import ViewType

    return list(
        _pages(
            lambda token: client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
        )
    )


def _pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = search(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return

"""Log a written report (index.html, summary.md) as artifacts of each study's sweep parent run.

On the local store (a `sqlite:///` tracking URI whose runs keep their artifacts in a local
folder) the files are copied into the run's artifact folder as MLflow's local artifact
repository writes them (a hidden temporary file in the folder, then an atomic rename); MLflow
then lists and serves them as any other artifact. That spares a report the MlflowClient, whose
import alone takes 1 s. Any other store (a tracking server, PostgreSQL, artifacts kept elsewhere)
goes through MlflowClient.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from batchscope.analysis import report_cache
from batchscope.analysis._mlflow_raw import sqlite_file
from batchscope.analysis.readonly_stores import local_stores
from batchscope.contract import ROLE, SWEEP_ROLE, sweep_run

REPORT_FILE = "index.html"
SUMMARY_FILE = "summary.md"
ARTIFACT_PATH = "report"
# MLflow's own prefix for a file being written (mlflow/store/artifact/local_artifact_repo.py): its
# listings skip such files, so a copy cut short never shows as an artifact.
_STAGING_PREFIX = ".artifact.uploading."

# The parent run as contract.sweep_run finds it through MLflow (the oldest active run tagged
# role=sweep; MLflow breaks ties by run id), with where its artifacts are kept.
_SQL_EXPERIMENTS = "SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'"
_SQL_PARENT = (
    "SELECT r.run_uuid, r.artifact_uri FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
    "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active' AND t.key = ? AND t.value = ? "
    "ORDER BY r.start_time ASC, r.run_uuid ASC LIMIT 1"
)


def log_report_artifacts(
    report: Path,
    studies: Sequence[str],
    *,
    tracking_uri: str | None = None,
    artifact_path: str = ARTIFACT_PATH,
) -> list[str]:
    """Log index.html and summary.md (from `report`, the path build_report returned, or its
    folder) as artifacts of each study's sweep parent run; returns the parent run ids.
    `tracking_uri` left out is the local store's (see `load_sweep`). A report logged there
    already and not rendered since is not logged again."""
    if tracking_uri is None:
        tracking_uri = local_stores()[1]

    folder = report if report.is_dir() else report.parent
    files = [folder / REPORT_FILE, folder / SUMMARY_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Report files not found: {missing}")
    target: dict[str, object] = {"tracking_uri": tracking_uri, "studies": list(studies), "path": artifact_path}
    logged = report_cache.logged_run_ids(folder, target)
    if logged is not None:
        return logged  # these very files are there already (an unchanged report: report_cache)
    local = _local_artifact_folders(tracking_uri, studies) if _plain_relative(artifact_path) else None
    if local is not None:
        run_ids = []
        for run_id, artifact_dir in local:
            for file in files:
                _copy_artifact(file, artifact_dir / artifact_path)
            run_ids.append(run_id)
    else:
        run_ids = _log_with_client(tracking_uri, studies, files, artifact_path)
    report_cache.record_logged(folder, target, run_ids)
    return run_ids


def _log_with_client(tracking_uri: str, studies: Sequence[str], files: list[Path], artifact_path: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run_ids = []
    for study in studies:
        run_id = _parent_run_id(client, study)
        for file in files:
            client.log_artifact(run_id, str(file), artifact_path=artifact_path)
        run_ids.append(run_id)
    return run_ids


def _parent_run_id(client: object, study: str) -> str:
    from mlflow import MlflowClient

    assert isinstance(client, MlflowClient)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise LookupError(f"No MLflow experiment named {study!r}.")
    run = sweep_run(client, experiment.experiment_id)
    if run is None:
        raise LookupError(f"No sweep parent run (tag {ROLE}={SWEEP_ROLE}) in study {study!r}.")
    return str(run.info.run_id)


def _plain_relative(artifact_path: str) -> bool:
    """A relative folder that stays inside the run's artifacts (MLflow checks the same)."""
    parts = Path(artifact_path).parts
    return bool(parts) and not Path(artifact_path).is_absolute() and ".." not in parts


def _local_artifact_folders(tracking_uri: str, studies: Sequence[str]) -> list[tuple[str, Path]] | None:
    """(parent run id, its artifact folder) per study, on a local SQLite store whose runs keep
    their artifacts in local folders; None whenever that is not plainly so (then MlflowClient
    logs them, and says what is missing)."""
    path = sqlite_file(tracking_uri)
    if path is None or not os.path.isfile(path):
        return None
    import sqlite3

    connection = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
    try:
        found = []
        for study in studies:
            experiments = connection.execute(_SQL_EXPERIMENTS, (study,)).fetchall()
            if len(experiments) != 1:
                return None
            parent = connection.execute(_SQL_PARENT, (experiments[0][0], ROLE, SWEEP_ROLE)).fetchone()
            folder = _local_folder(parent[1]) if parent is not None else None
            if parent is None or folder is None:
                return None
            found.append((str(parent[0]), folder))
        return found
    except sqlite3.Error:
        return None  # not the tables this code knows: MLflow's client reads them as they are
    finally:
        connection.close()


def _local_folder(artifact_uri: str | None) -> Path | None:
    """The local folder of a `file:///...` artifact URI, or of a bare absolute path (as MLflow
    stores them); None for any other place (a server's mlflow-artifacts:/, s3://, ...)."""
    if not artifact_uri:
        return None
    if artifact_uri.startswith("/"):
        return Path(artifact_uri)
    parts = urlsplit(artifact_uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        return None
    return Path(unquote(parts.path))


def _copy_artifact(file: Path, folder: Path) -> None:
    """Copy `file` into `folder` as MLflow's local artifact repository does: a hidden temporary
    file beside the target, its times and mode from the source, then an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=folder, prefix=_STAGING_PREFIX)
    try:
        with os.fdopen(descriptor, "wb") as out, file.open("rb") as source:
            shutil.copyfileobj(source, out)
        shutil.copystat(file, staging)
        os.replace(staging, folder / file.name)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise

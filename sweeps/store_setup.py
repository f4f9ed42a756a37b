"""Set up where a sweep keeps its state, the Optuna storage and the MLflow tracking store: decide, check, create, open.

(`batchscope.analysis.readonly_stores` opens the same stores read-only, for reports.)

Default (nothing to start): everything under `mlruns/` in the working directory,
an Optuna journal file (safe for several processes, unlike SQLite) and MLflow's
SQLite store with artifacts beside it. Scaled out: a database URL for Optuna and
an MLflow tracking server.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from batchscope.cache import cache_dir
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.locations import check_storage, check_tracking_uri, redact, scrub

DEFAULT_ROOT = "mlruns"
_RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")
CONNECT_TIMEOUT_S = 5  # an unreachable database or server fails within seconds, not at the OS's TCP timeout


def root_dir() -> Path:
    """The local store folder: $BATCHSCOPE_ROOT, else ./mlruns."""
    return Path(os.environ.get("BATCHSCOPE_ROOT", DEFAULT_ROOT)).absolute()


@dataclass(frozen=True)
class Stores:
    storage_url: str  # what the user gave (or the local journal path); never logged unredacted
    tracking_uri: str
    artifact_root: str | None  # only for the local SQLite store; a server decides its own
    local_root: Path | None

    @property
    def storage_label(self) -> str:
        return redact(self.storage_url)

    def local_paths(self) -> dict[str, Path]:
        """The stores kept on this machine's disks, by name (for a full disk's message)."""
        paths: dict[str, Path] = {}
        if "://" not in self.storage_url:
            paths["the Optuna journal"] = Path(self.storage_url)
        if self.tracking_uri.startswith("sqlite:///"):
            paths["the MLflow store"] = Path(self.tracking_uri.removeprefix("sqlite:///"))
        if self.artifact_root and self.artifact_root.startswith("file://"):
            paths["MLflow's artifacts"] = Path(self.artifact_root.removeprefix("file://"))
        return paths


def resolve(
    storage: str | None,
    tracking_uri: str | None,
    *,
    fields: tuple[str, str] = ("storage", "tracking_uri"),
    writing: bool = True,
) -> Stores:
    """Decide the stores without touching them (nothing is created here).

    Both are checked first (scheme, host, database name, a file's folder), so that a bad one is
    refused in one line naming its field (`fields`: the config keys, or a command's options)
    before any command writes anything. Readers (`writing=False`) skip what only matters to a
    store about to be made.
    """
    root = root_dir()
    local = "BATCHSCOPE_ROOT" if os.environ.get("BATCHSCOPE_ROOT") else "the local store"
    storage_field = fields[0] if storage else local
    storage_url = check_storage(storage or str(root / "optuna.journal"), storage_field, writing=writing)
    if tracking_uri is None:
        uri = check_tracking_uri(f"sqlite:///{root / 'mlflow.db'}", local, writing=writing)
        return Stores(storage_url, uri, (root / "artifacts").as_uri(), root)
    uri = check_tracking_uri(tracking_uri, fields[1], writing=writing)
    return Stores(storage_url, uri, None, root if storage is None else None)


def open_storage(stores: Stores, *, heartbeat: dict[str, Any] | bool = True) -> optuna.storages.BaseStorage:
    """The Optuna storage object; raises UserError when it cannot be reached."""
    url = stores.storage_url
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        if scheme.split("+")[0] in _RDB_SCHEMES:
            kwargs: dict[str, Any] = {"engine_kwargs": _engine_kwargs(url)}
            if heartbeat and not scheme.startswith("sqlite"):
                # Dead-worker detection: a trial whose worker stops beating is failed and re-run.
                beat = heartbeat if isinstance(heartbeat, dict) else {}
                kwargs.update(
                    heartbeat_interval=int(beat.get("interval_s", 30)), grace_period=int(beat.get("grace_s", 120))
                )
            return _rdb_with_retry(url, kwargs)
        if scheme in ("redis", "rediss"):
            return _redis_storage(url)
        if scheme:
            raise UserError(
                f"storage {redact(url)!r}: unsupported scheme {scheme!r}; use a file path, "
                "postgresql://, mysql://, sqlite:/// or redis://"
            )
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return journal_storage(path)
    except UserError:
        raise
    except ImportError as exc:
        raise _missing_driver("storage", url, exc) from None
    except Exception as exc:  # any driver error: one line, without the password
        raise UserError(
            f"storage {redact(url)!r} cannot be reached: {driver_error(exc, url)}; "
            "check that the database is running and the URL is right"
        ) from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options: connections checked before use, and a connect timeout (libpq and
    MySQL wait for the OS's TCP timeout, minutes, for a server that does not answer)."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.split("://", 1)[0].split("+")[0].lower() in ("postgresql", "mysql") and "connect_timeout=" not in url:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def _redis_storage(url: str) -> optuna.storages.JournalStorage:
    """Optuna's Redis journal, with socket timeouts (redis-py has none: a silent server hangs it)."""
    from optuna.storages.journal import JournalRedisBackend

    if "socket_connect_timeout=" not in url and "socket_timeout=" not in url:
        timeouts = f"socket_connect_timeout={CONNECT_TIMEOUT_S}&socket_timeout={CONNECT_TIMEOUT_S}"
        url += ("&" if "?" in url else "?") + timeouts
    with quiet_experimental():
        return optuna.storages.JournalStorage(JournalRedisBackend(url))


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """No "experimental" warning (a storage opening, set_metric_names), even where quiet_libraries() was not called:
    an error in opening must be the only line the user sees."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _missing_driver(field: str, url: str, exc: ImportError) -> UserError:
    """The store's driver is not installed: say which, and how to install it."""
    base = url.split("://", 1)[0].split("+")[0].lower()
    if base in ("redis", "rediss"):
        fix = "pip install 'batchscope[redis]'"
    elif base == "mysql":
        fix = "pip install pymysql and write the URL as mysql+pymysql://..."
    else:
        fix = "pip install 'batchscope[postgres]'"
    missing = f" ({exc.name})" if exc.name else ""
    return UserError(f"{field} {redact(url)!r} needs a driver that is not installed{missing}: {fix}")


def driver_error(exc: BaseException, url: str) -> str:
    """A database driver's error as one line a user can read: SQLAlchemy's "(psycopg.OperationalError)"
    prefix and "(Background on this error at: ...)" suffix dropped, and the URL's secrets removed
    wherever the driver echoed them."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text)
    text = re.sub(r"^\([\w.]+\)\s*", "", text).strip()
    text = re.sub(r"\s*\[SQL: .*", "", text)  # the statement and its parameters: not for the user
    return scrub(text.rstrip(". ") or type(exc).__name__, url)


def _rdb_with_retry(url: str, kwargs: dict[str, Any], attempts: int = 4) -> optuna.storages.RDBStorage:
    # Workers that start together race to create Optuna's tables; the loser retries once they exist.
    import time

    for attempt in range(attempts):
        try:
            with quiet_experimental():
                return optuna.storages.RDBStorage(url, **kwargs)
        except ImportError:
            raise
        except Exception as exc:
            if attempt == attempts - 1 or _cannot_connect(exc):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# What a driver says when the server is not there, or will not let us in: retrying cannot help.
_NO_CONNECTION = re.compile(
    r"refused|timeout expired|timed out|could not connect|could not translate host|failed to resolve host"
    r"|name or service not known|authentication failed|no password supplied|database \S+ does not exist"
    r"|role \S+ does not exist|unknown database|access denied"
)


def _cannot_connect(exc: BaseException) -> bool:
    return _NO_CONNECTION.search(str(exc).lower()) is not None


def journal_storage(path: Path | str) -> optuna.storages.JournalStorage:
    """The local journal file; every process must use this same lock type to be safe.

    Opening sets a torn last record aside and refuses a corrupt one in one line (sweeps.journal).
    """
    from optuna.storages.journal import JournalFileOpenLock

    from batchscope.sweeps.journal import SafeJournalFileBackend

    return optuna.storages.JournalStorage(SafeJournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def check_tracking(stores: Stores, *, create: bool = True, field: str = "tracking_uri") -> None:
    """Fail early, with one line naming `field`, if the MLflow tracking store cannot be reached:
    a server gets CONNECT_TIMEOUT_S to answer (MLflow's own client retries for minutes).

    With `create`, make the local store's folder (nothing is created otherwise).
    """
    uri = check_tracking_uri(stores.tracking_uri, field, writing=create)
    if uri.startswith(("http://", "https://")):
        _check_http_server(uri, field)
        return
    if uri.split("://", 1)[0].split("+")[0].lower() in ("postgresql", "mysql", "mssql"):
        _check_sql_server(uri, field)
        if create:
            _init_sql_store(uri)
        return
    if create and uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        _init_sqlite_store(uri, db)


def _check_http_server(uri: str, field: str) -> None:
    """GET /health of an MLflow server; credentials in the URL go in a header, as MLflow's client sends them."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(uri)
    headers = {}
    if parts.username is not None or parts.password is not None:
        user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    bare = urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", "", "", "")).rstrip("/")
    if parts.port is not None:
        bare += f":{parts.port}"
    health = bare + parts.path.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(health, headers=headers), timeout=CONNECT_TIMEOUT_S) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise UserError(
            f"{field} {redact(uri)!r} cannot be reached: {scrub(_first_line(reason), uri)}; "
            "start the server (batchscope server) or fix the URL"
        ) from None


def _check_sql_server(uri: str, field: str) -> None:
    """Connect once to a database that MLflow tracks in, with a timeout (MLflow sets none)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, **_engine_kwargs(uri))
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
        finally:
            engine.dispose()
    except ImportError as exc:
        raise _missing_driver(field, uri, exc) from None
    except Exception as exc:
        raise UserError(
            f"{field} {redact(uri)!r} cannot be reached: {driver_error(exc, uri)}; "
            "check that the database is running and the URL is right"
        ) from None


def _init_sql_store(uri: str) -> None:
    """Create MLflow's schema in a PostgreSQL or MySQL database under a lock the database holds.

    Workers started together on a new database each ran MLflow's migrations, and all but one
    died with a traceback (PostgreSQL: duplicate key ... (alembic_version, 2200)). Whoever takes
    the lock first makes the tables; the others find them made. MLflow keeps the store it opens
    here for the Tracker that follows, so a store that exists costs one lock round trip.
    """
    import sqlalchemy
    from mlflow import MlflowClient

    from batchscope.sweeps.owners import database_lock

    engine = sqlalchemy.create_engine(uri, **_engine_kwargs(uri))
    try:
        if engine.dialect.name not in ("postgresql", "mysql"):  # SQL Server: left as MLflow makes it
            return
        with database_lock(engine, "batchscope-mlflow-schema"):
            MlflowClient(uri).search_experiments(max_results=1)
    finally:
        engine.dispose()


def _init_sqlite_store(uri: str, db: Path) -> None:
    """Create MLflow's SQLite schema under a file lock: workers starting together would race its migrations.

    A new store starts as a copy of an empty database that MLflow's migrations made once for
    this MLflow version (they take 1 s on a quiet machine, 3–4 s while a sweep starts; the
    copy 0.04 s). Opening it, MLflow adds its default experiment as on any new database. If
    anything is wrong with the copy, the store is made the usual way.
    """
    import fcntl

    with open(db.parent / ".mlflow-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from mlflow import MlflowClient

        new = not db.exists()
        copied = new and _copy_empty_store(db)
        try:
            try:
                MlflowClient(uri).search_experiments(max_results=1)
            except Exception:
                if not copied:
                    raise
                _discard_copy(uri, db)
                MlflowClient(uri).search_experiments(max_results=1)
        except Exception as exc:
            if not new:
                raise
            # A new store that could not be made whole goes: left half-built (a disk that filled
            # during MLflow's migrations), every later command failed with "table ... already exists".
            _forget_store(uri, db)
            from batchscope.sweeps import diskspace

            if diskspace.is_disk_full(exc):
                raise diskspace.disk_full_error({"the MLflow store": db}, None, 0) from None
            raise


def empty_store_path() -> Path:
    """Where the empty, migrated MLflow database of this MLflow version is cached.

    Named by the MLflow version and its migration scripts (hence its schema head), so an
    upgrade or a patched MLflow makes a new one.
    """
    import importlib.util

    from mlflow.version import VERSION

    spec = importlib.util.find_spec("mlflow")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    versions = Path(folders[0], "store", "db_migrations", "versions") if folders else None
    scripts = sorted(p.name for p in versions.glob("*.py")) if versions is not None else []
    digest = hashlib.sha256("\n".join([VERSION, *scripts]).encode()).hexdigest()[:12]
    return cache_dir() / f"mlflow-{VERSION}-{digest}.db"


def _copy_empty_store(db: Path) -> bool:
    """Put a copy of the cached empty store at `db` (made first if missing); False if that cannot be done."""
    import shutil
    import tempfile

    try:
        template = empty_store()
        fd, name = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
        os.close(fd)
    except Exception as exc:  # a cache folder we cannot write, a failed migration: the usual way
        logging.getLogger(__name__).debug("no cached MLflow store: %s", exc)
        return False
    tmp = Path(name)
    try:
        shutil.copyfile(template, tmp)
        if not _is_empty_store(tmp):
            template.unlink(missing_ok=True)  # corrupt or not ours: made again next time
            return False
        os.replace(tmp, db)
        return True
    except OSError as exc:
        logging.getLogger(__name__).debug("cached MLflow store not copied: %s", exc)
        return False
    finally:
        tmp.unlink(missing_ok=True)


def empty_store() -> Path:
    """The cached empty store, made by MLflow's migrations if it is not there yet.

    Several processes may get here at once: one migrates under a lock in the cache, and the
    file appears whole (written aside, then renamed).
    """
    import fcntl
    import tempfile

    path = empty_store_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".mlflow-store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            tmp.unlink()  # SQLite makes the file: an empty file would not be a database
            engine = create_sqlalchemy_engine(f"sqlite:///{tmp}")
            try:
                _initialize_tables(engine)  # tables and migrations only: MLflow adds experiment 0 on opening
            finally:
                engine.dispose()
            if not _is_empty_store(tmp):
                raise RuntimeError(f"MLflow's migrations did not make an empty store at {tmp}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _is_empty_store(path: Path) -> bool:
    """A whole SQLite database with MLflow's schema version and tables, and no experiment yet."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            if conn.execute("PRAGMA quick_check").fetchone() != ("ok",):
                return False
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"alembic_version", "experiments", "runs", "metrics", "params", "tags"} <= tables:
                return False
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            experiments = conn.execute("SELECT COUNT(*) FROM experiments").fetchone()
            return len(versions) == 1 and experiments == (0,)
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def _discard_copy(uri: str, db: Path) -> None:
    """MLflow refused a copied store: forget its connections to that file, remove it and the cached one."""
    _forget_store(uri, db)
    empty_store_path().unlink(missing_ok=True)


def _forget_store(uri: str, db: Path) -> None:
    """Close MLflow's connections to a local store's file and remove it."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
    if engine is not None:
        engine.dispose()
    db.unlink(missing_ok=True)


def quiet_libraries() -> None:
    """MLflow's and alembic's INFO lines would drown the progress display."""
    for name in ("mlflow", "alembic", "optuna", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs every database error with its SQL and parameters before raising it; batchscope
    # reports the error it raises in one line (a full disk printed hundreds of lines of metrics).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # Optuna warns, in two lines on stderr, each time batchscope uses a feature it calls
    # experimental (heartbeat, stale-trial recovery, the Redis journal): nothing for a user to act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # MLflow's HTTP client retries 7 times with backoff, minutes before a server that is gone is
    # reported; 3 retries (about 7 s) still ride over a restart, and a silent server is cut off.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _first_line(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

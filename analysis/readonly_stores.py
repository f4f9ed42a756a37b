"""A sweep's stores opened for reading: the Optuna storage and the MLflow tracking URI, resolved
the same way everywhere in analysis/ (and the same defaults as the sweep runner's embedded store).

Read-only: nothing here creates a store or a file (a missing journal is an error). Creating,
locking and writing the stores is the sweep's job, in sweeps/store_setup.py."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

DEFAULT_TRACKING_UI = "http://127.0.0.1:5000"

StorageLike = str | Path | optuna.storages.BaseStorage


def local_stores() -> tuple[str, str]:
    """(Optuna journal path, MLflow tracking URI) of the local store, where the CLI keeps them:
    under $BATCHSCOPE_ROOT, else ./mlruns, decided by the sweeps' own `resolve` (one home for it),
    read at each call so that a changed BATCHSCOPE_ROOT is followed."""
    from batchscope.sweeps.store_setup import resolve

    stores = resolve(None, None, writing=False)
    return stores.storage_url, stores.tracking_uri


def open_optuna_storage(storage: StorageLike) -> optuna.storages.BaseStorage:
    """An Optuna storage from a storage object, a database URL, or a journal file path.

    A URL (anything with ``://``) goes to Optuna's RDB storage; anything else is read as the
    path of a journal file, like the local default ``mlruns/optuna.journal``.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    text = str(storage)
    if "://" in text:
        return optuna.storages.RDBStorage(text)
    path = Path(text)
    # JournalFileBackend creates a missing file; a reader must not leave one behind.
    if not path.is_file():
        raise FileNotFoundError(f"Optuna journal file not found: {storage=}")
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def is_sql_tracking_uri(tracking_uri: str) -> bool:
    """True for the database URIs whose tables analysis/ reads directly (fast path)."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in {"sqlite", "postgresql", "mysql", "mssql"}


def redact_url(url: str) -> str:
    """A store URL fit for messages and reports: every credential form masked (user:secret@host,
    :secret@host, ?password=...), by the one mask the sweeps use."""
    from batchscope.sweeps.locations import redact

    return redact(url)

"""One trial created and sampled at a time across the processes sharing a study (sweeps.owners)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna

from batchscope.sweeps.owners import sampling_lock
from batchscope.sweeps.store_setup import journal_storage


def _order_of_two_holders(
    first: optuna.storages.BaseStorage, second: optuna.storages.BaseStorage, url: str
) -> list[str]:
    """A holds the lock; B asks for it while A still holds it; the order they went in and out."""
    said: list[str] = []
    b_asking = threading.Event()

    def a() -> None:
        with sampling_lock(first, url, "s"):
            said.append("A in")
            b_asking.wait(30)
            time.sleep(0.3)  # B is blocked on the lock by now, unless the lock lets it through
            said.append("A out")

    def b() -> None:
        while not said:
            time.sleep(0.01)
        b_asking.set()
        with sampling_lock(second, url, "s"):
            said.append("B in")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return said


def test_a_postgresql_study_is_sampled_by_one_process_at_a_time(pg_database: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:5432/{pg_database}"
    # Separate storages, as separate processes have: the advisory lock is per database session.
    first, second = optuna.storages.RDBStorage(url), optuna.storages.RDBStorage(url)
    assert _order_of_two_holders(first, second, url) == ["A in", "A out", "B in"]


def test_a_local_journal_is_sampled_by_one_process_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "optuna.journal"
    storage = journal_storage(path)
    assert _order_of_two_holders(storage, storage, str(path)) == ["A in", "A out", "B in"]

"""The report's parts in forked processes (analysis/_fork.py): same results as in one process,
errors and warnings where they would have been, nothing lost when a child dies."""

from __future__ import annotations

import os
import threading
import time
import warnings

import pytest

from batchscope.analysis import _fork
from batchscope.analysis._fork import Background, fork_map

PARENT = os.getpid()


def _slow_square(item: int) -> tuple[int, int]:
    time.sleep(0.3)  # long enough that every process takes some of the items, even on a loaded machine
    return item * item, os.getpid()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_fork_map_returns_every_result_in_order(workers: int) -> None:
    results = fork_map(_slow_square, list(range(9)), workers=workers)
    assert [value for value, _ in results] == [i * i for i in range(9)]
    # The work was spread: one process per worker, this one among them.
    assert len({pid for _, pid in results}) == workers
    assert PARENT in {pid for _, pid in results}


def test_an_error_is_raised_here_as_in_one_process() -> None:
    def fails_on_three(item: int) -> int:
        if item == 3:
            raise ValueError(f"bad item {item}")
        return item

    with pytest.raises(ValueError, match="bad item 3"):
        fork_map(fails_on_three, list(range(6)), workers=2)


def test_an_error_that_cannot_be_pickled_arrives_as_its_text() -> None:
    class Unpicklable(Exception):
        def __init__(self) -> None:
            super().__init__("held a lambda")
            self.callback = lambda: None

    def fails_in_a_child(item: int) -> int:
        time.sleep(0.2)  # the child starts long before this process has done all 8
        if os.getpid() != PARENT:
            raise Unpicklable()
        return item

    # Whichever item a child took fails; the parent's succeed.
    with pytest.raises(RuntimeError, match="held a lambda"):
        fork_map(fails_in_a_child, list(range(8)), workers=2)


def test_warnings_in_a_child_are_warned_here() -> None:
    def warns(item: int) -> int:
        time.sleep(0.1)
        warnings.warn(f"item {item} looked odd", UserWarning, stacklevel=1)
        return item

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fork_map(warns, list(range(4)), workers=2) == [0, 1, 2, 3]
    assert sorted(str(w.message) for w in caught) == [f"item {i} looked odd" for i in range(4)]


def test_a_child_that_dies_loses_nothing() -> None:
    def dies_in_a_child(item: int) -> int:
        time.sleep(0.1)
        if os.getpid() != PARENT:
            os._exit(9)  # killed mid-item, as by the OOM killer
        return item + 1

    assert fork_map(dies_in_a_child, list(range(5)), workers=3) == [1, 2, 3, 4, 5]


def test_background_returns_its_result_and_survives_its_childs_death() -> None:
    assert Background(lambda: (os.getpid() != PARENT, 42), workers=2).result() == (True, 42)
    assert Background(lambda: (os.getpid() != PARENT, 42), workers=1).result() == (False, 42)

    def dies_in_a_child() -> str:
        if os.getpid() != PARENT:
            os._exit(9)
        return "computed here"

    assert Background(dies_in_a_child, workers=2).result() == "computed here"
    with pytest.raises(ZeroDivisionError):
        Background(lambda: 1 / 0, workers=2).result()


def test_a_discarded_background_child_is_stopped() -> None:
    pending = Background(lambda: time.sleep(60), workers=2)
    assert pending._child is not None
    pid = pending._child[0]
    started = time.monotonic()
    pending.discard()
    assert time.monotonic() - started < 10  # not the child's 60 s
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left behind


def test_the_processes_are_one_per_cpu_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fork.threading, "active_count", lambda: 1)  # threads earlier tests left behind
    monkeypatch.setenv(_fork.ENV, "3")
    assert _fork.processes() == 3
    monkeypatch.setenv(_fork.ENV, "1")
    assert _fork.processes() == 1
    monkeypatch.setenv(_fork.ENV, "two")
    with pytest.warns(UserWarning, match="BATCHSCOPE_REPORT_PROCESSES must be a whole number.*'two'"):
        assert _fork.processes() == 1
    monkeypatch.delenv(_fork.ENV)
    assert _fork.processes() == len(os.sched_getaffinity(0))


def test_no_fork_while_another_thread_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork copies the locks other threads hold (a sweep's writer threads, Jupyter's)."""
    monkeypatch.setenv(_fork.ENV, "2")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert _fork.processes() == 1
        assert {pid for _, pid in fork_map(_slow_square, [1, 2])} == {PARENT}
    finally:
        release.set()
        other.join()

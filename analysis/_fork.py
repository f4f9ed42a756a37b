"""The report's independent parts run side by side in forked copies of this process.

A report's first render is mostly single-threaded Python: matplotlib laying out and drawing eight
figures (about half of it) and the fANOVA forest (sklearn's import, mostly). Each part needs
only what the parent already loaded, so a forked child (copy-on-write, a few milliseconds to
start) can do it with no imports and no pickling of its inputs: only results travel back, through
a pipe. Where forking is not safe or not possible, everything runs in this process, in order,
with the same results:

- no `fork` (Windows, macOS's default is not relied on either: only Linux forks here);
- other Python threads alive (a sweep process with its writer threads, Jupyter): a fork copies
  locks those threads may hold;
- one CPU, or `BATCHSCOPE_REPORT_PROCESSES=1`.

A child that dies (killed, out of memory) costs only time: what it did not deliver is computed
again here. An exception inside the work is raised here as it would have been in order, and a
warning is warned again here.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

ENV = "BATCHSCOPE_REPORT_PROCESSES"


def processes() -> int:
    """How many processes (this one included) the report may use now; 1 means no forking."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return 1
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        if wanted.isdigit() and int(wanted) >= 1:
            return int(wanted)
        # Not worth stopping a report for: said once, and the report runs in this process alone.
        message = f"{ENV} must be a whole number of processes, at least 1, but got {wanted!r}; using 1."
        warnings.warn(message, stacklevel=2)
        return 1
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class _Outcome(Generic[R]):
    """One item's result, or the exception it raised, with the warnings it warned."""

    value: R | None
    error: BaseException | None
    caught: list[tuple[str, type[Warning]]]


def _run(fn: Callable[[T], R], item: T) -> _Outcome[R]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value, error = fn(item), None
        except Exception as exc:  # raised again in the parent, in order
            value, error = None, exc
    return _Outcome(value, error, [(str(w.message), w.category) for w in caught])


def _portable(outcome: _Outcome[R]) -> _Outcome[R]:
    """The outcome, with an exception that cannot be pickled replaced by one that can."""
    if outcome.error is None:
        return outcome
    try:
        pickle.dumps(outcome.error)
        return outcome
    except Exception:
        return _Outcome(None, RuntimeError(repr(outcome.error)), outcome.caught)


def _child(fn: Callable[[T], R], items: Sequence[T], tasks: int, results: int) -> None:
    """Take item numbers from the shared task pipe until it is empty; send back what was done."""
    done: dict[int, _Outcome[R]] = {}
    while (token := os.read(tasks, 1)) != b"":  # one byte per item: reads of 1 byte are atomic
        index = token[0]
        done[index] = _portable(_run(fn, items[index]))
    payload = pickle.dumps(done, protocol=pickle.HIGHEST_PROTOCOL)
    with os.fdopen(results, "wb") as pipe:
        pipe.write(payload)


def _fork_child(fn: Callable[[T], R], items: Sequence[T], tasks: int) -> tuple[int, int]:
    """A forked worker: its pid and the read end of its result pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers
        code = 1
        try:
            os.close(read)
            _child(fn, items, tasks, write)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def _collect(pid: int, read: int) -> dict[int, _Outcome[R]]:
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not payload:
        return {}  # it died: its items are done again by the parent
    try:
        done: dict[int, _Outcome[R]] = pickle.loads(payload)
    except Exception:
        return {}
    return done


def fork_map(fn: Callable[[T], R], items: Sequence[T], *, workers: int | None = None) -> list[R]:
    """[fn(item) for item in items], spread over `workers` processes (this one included).

    Items are handed out one at a time, so a slow one does not hold up the rest. Results come
    back pickled; fn must return something picklable. At most 255 items.
    """
    workers = processes() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, but got {workers=}.")
    if len(items) > 255:
        raise ValueError(f"fork_map hands out at most 255 items, but got {len(items)}.")
    children = min(workers, len(items)) - 1
    done: dict[int, _Outcome[R]] = {}
    if children > 0:
        tasks, feed = os.pipe()
        os.write(feed, bytes(range(len(items))))  # 255 bytes fit any pipe's buffer
        os.close(feed)  # an empty pipe now reads as the end: the workers stop
        forked = [_fork_child(fn, items, tasks) for _ in range(children)]
        while (token := os.read(tasks, 1)) != b"":  # this process works too
            done[token[0]] = _run(fn, items[token[0]])
        os.close(tasks)
        for pid, read in forked:
            done.update(_collect(pid, read))
    results = []
    for index, item in enumerate(items):
        outcome = done.get(index) or _run(fn, item)  # in order: also what a dead child left
        for message, category in outcome.caught:
            warnings.warn(message, category, stacklevel=2)
        if outcome.error is not None:
            raise outcome.error
        results.append(outcome.value)
    return results  # type: ignore[return-value]  # values of items without an error are R


class Background(Generic[R]):
    """fn() started in a forked child now, its result collected by `result()`; in this process,
    at `result()`, where forking is off."""

    def __init__(self, fn: Callable[[], R], *, workers: int | None = None) -> None:
        self._fn = fn
        self._child: tuple[int, int] | None = None
        if (processes() if workers is None else workers) > 1:
            tasks, feed = os.pipe()
            os.write(feed, b"\x00")
            os.close(feed)
            self._child = _fork_child(lambda _none: fn(), [None], tasks)
            os.close(tasks)

    def result(self) -> R:
        done: dict[int, _Outcome[R]] = _collect(*self._child) if self._child is not None else {}
        self._child = None
        outcome = done.get(0) or _run(lambda _none: self._fn(), None)
        for message, category in outcome.caught:
            warnings.warn(message, category, stacklevel=2)
        if outcome.error is not None:
            raise outcome.error
        return outcome.value  # type: ignore[return-value]

    def discard(self) -> None:
        """Stop the child if its result was never asked for (the caller failed on the way)."""
        if self._child is None:
            return
        pid, read = self._child
        self._child = None
        os.kill(pid, signal.SIGKILL)
        os.close(read)
        os.waitpid(pid, 0)

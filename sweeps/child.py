"""Helpers for the processes a sweep starts to train in: the trial worker and torchrun's ranks."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Mapping

_PROGRESS_EVERY_S = 0.25


class ProgressThrottle:
    """Hands the latest training loss to `send`, at most a few times a second."""

    def __init__(self, send: Callable[[int, float], None]) -> None:
        self._send = send
        self._last = 0.0

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        loss = values.get("train/loss")
        now = time.monotonic()
        if loss is not None and now - self._last >= _PROGRESS_EVERY_S:
            self._last = now
            self._send(step, float(loss))


def die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        parent_death_signal()()


def parent_death_signal() -> Callable[[], None]:
    """A function that sets PR_SET_PDEATHSIG; libc is looked up here, not in a forked child."""
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl

    def set_it() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_it

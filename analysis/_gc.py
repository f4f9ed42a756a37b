"""Pausing Python's cyclic garbage collector around work that allocates many objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while many objects are built and kept: it would rescan
    them again and again (about half of the load time at a million rows, and a tenth of the
    charts' time: every matplotlib artist is a tracked object). Reference counting still frees
    what is dropped; cycles left behind are collected once the collector runs again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

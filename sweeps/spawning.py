"""Start a `spawn` child without it re-running the caller's main module.

multiprocessing's spawn start method sends the child the main module's path (or its
`-m` name), and the child runs it again as `__mp_main__` before anything else, so that
functions defined in the caller's script can be unpickled there. A trial worker needs
none of that: its target and every message it receives are batchscope objects. And it
costs dearly: a script that calls `batchscope.sweep(...)` without an
`if __name__ == "__main__":` guard would start the sweep again inside every child, which
multiprocessing refuses ("bootstrapping phase"), so every trial failed with "worker
process exited with code 1". A Jupyter kernel's main module is IPython's, with no file.

So while a child is started, `sys.modules["__main__"]` is a stand-in with neither a
file nor a module name: spawn then prepares the child with no main module to run, as it
does for `python -c`. Only the preparation data is affected; the child imports what it
unpickles (batchscope.sweeps.worker) as usual.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Iterator

# Workers are started from several slot threads (a restart after a crash): one swap at a time,
# so that a second start never takes the first one's stand-in for the real module.
_LOCK = threading.Lock()


@contextlib.contextmanager
def without_callers_main() -> Iterator[None]:
    """Hide the caller's `__main__` from multiprocessing while a spawn child starts."""
    with _LOCK:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__: nothing to re-run
        try:
            yield
        finally:
            if main is None:
                sys.modules.pop("__main__", None)
            else:
                sys.modules["__main__"] = main

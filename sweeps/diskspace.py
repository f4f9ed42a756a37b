"""A full disk is an error to report, not a crash: which store, how much room it needs.

When the disk under a store fills, SQLite says "database or disk is full", file writes raise
ENOSPC, torch.save fails with an opaque "unexpected pos". Both stores stay readable (SQLite
rolls the transaction back; the journal backend removes a partly written record,
sweeps.journal), so the sweep stops with one line, and the same command resumes it once room
has been made: trials left RUNNING are failed and queued again by `Sweep.recover`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from batchscope.sweeps.errors import UserError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXTS = ("database or disk is full", "no space left on device", "disk quota exceeded", "disk full")
# Below this much room a filesystem counts as full: SQLite needs room for its rollback journal,
# the journal backend for a record, a checkpoint for the model's weights.
LOW_SPACE_BYTES = 1 << 20


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it came from, says that a disk or quota is full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Room left on the filesystem holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def full_paths(paths: Iterable[Path]) -> list[Path]:
    """The paths whose filesystem has less than LOW_SPACE_BYTES left."""
    return [p for p in paths if (free := free_bytes(p)) is not None and free < LOW_SPACE_BYTES]


def used_bytes(paths: Iterable[Path]) -> int:
    """What the local stores take now (files, and folders summed)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def disk_full_error(where: dict[str, Path], per_trial_bytes: float | None, trials_left: int) -> UserError:
    """The one line a full disk gets: the store(s) on it, the room left, the room to make.

    `where` maps a store's name ("the MLflow store", "the Optuna journal", ...) to its path.
    """
    full = full_paths(where.values()) or list(where.values())
    names = [name.removeprefix("the ") for name, path in where.items() if path in full] or list(where)
    folder = Path(os.path.commonpath([str(p.absolute()) for p in full]))
    free = min((b for p in full if (b := free_bytes(p)) is not None), default=None)
    room = f"{free / 2**20:.1f} MB left" if free is not None else "no room left"
    need = "make room"
    if per_trial_bytes is not None and trials_left > 0:
        # Half as much again for SQLite's rollback journal and the report at the end.
        mb = max(10.0, 1.5 * per_trial_bytes * trials_left / 2**20)
        per = per_trial_bytes / 2**20
        need = f"about {per:.1f} MB per trial so far and {trials_left} trial(s) to go: free at least {mb:.0f} MB"
    return UserError(
        f"the disk holding {folder} ({', '.join(names)}) is full, {room}; {need}, then run the same "
        "command again to continue (the finished trials are kept)"
    )

"""The local Optuna journal, made to survive a torn write.

Optuna's `JournalFileBackend` appends each batch of records with one `write` and an fsync
under a lock, but a record cut short (a full disk, a power cut, a kill mid-write, a stray
line appended) makes every later command fail: the next append glues onto the torn tail,
and reading raises on a line that is not JSON. `SafeJournalFileBackend` is Optuna's
backend with what it lacks around it:

- on opening, under Optuna's own lock: an incomplete last record is set aside into a
  sidecar file beside the journal (one warning line names it), and the study opens as of
  its last complete record; a corrupt record followed by complete ones is refused in one
  line (`UserError`) naming the line and `batchscope doctor --repair`;
- before each append, the same for a record torn since by a process that died mid-write;
- appends are whole records or nothing: a failed write or fsync is cut back off.

`scan_journal` and `mend_journal` are the same knowledge for `batchscope doctor`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from batchscope.sweeps.errors import UserError

_logger = logging.getLogger(__name__)
_CHUNK = 1 << 16
# Optuna's journal operations that create what later records refer to by position (its ids):
# losing one of these would shift every later id onto the wrong study or trial.
_CREATE_STUDY, _DELETE_STUDY, _CREATE_TRIAL = 0, 1, 4
_STUDY_OPS = (1, 2, 3, 4)
_TRIAL_OPS = (5, 6, 7, 8, 9)


@dataclass(frozen=True)
class BadLine:
    """A line of the journal that is not a complete record: 1-based number and byte range."""

    number: int
    start: int
    end: int


@dataclass(frozen=True)
class JournalScan:
    """What a journal file holds: its complete records, corrupt lines among them, a torn tail."""

    path: Path
    size: int
    records: int  # complete records, corrupt lines excluded
    complete_end: int  # byte offset just past the last complete record
    corrupt: tuple[BadLine, ...]  # bad lines with complete records after them
    tail: tuple[BadLine, ...]  # bad lines after the last complete record

    @property
    def torn(self) -> bool:
        return self.complete_end < self.size

    @property
    def healthy(self) -> bool:
        return not self.torn and not self.corrupt


def is_record(line: bytes) -> bool:
    """A complete journal record: one line ending in a newline, holding a JSON object with an op code."""
    if not line.endswith(b"\n"):
        return False
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        return False
    return isinstance(record, dict) and type(record.get("op_code")) is int


def _lines(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(line number, start, end) of each line, split on b"\\n" only, as Optuna reads them."""
    pos, number = 0, 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        end = len(data) if newline < 0 else newline + 1
        number += 1
        yield number, pos, end
        pos = end


def scan_journal(path: str | Path, data: bytes | None = None) -> JournalScan:
    """Parse every line once: cheap next to Optuna's own replay, which parses them all again."""
    path = Path(path)
    data = path.read_bytes() if data is None else data
    records, complete_end = 0, 0
    corrupt: list[BadLine] = []
    pending: list[BadLine] = []  # bad lines not yet known to be followed by a complete record
    for number, start, end in _lines(data):
        if is_record(data[start:end]):
            corrupt += pending
            pending = []
            records += 1
            complete_end = end
        else:
            pending.append(BadLine(number, start, end))
    return JournalScan(path, len(data), records, complete_end, tuple(corrupt), tuple(pending))


def corrupt_error(scan: JournalScan) -> UserError:
    """The one line that refuses a journal with corruption in its middle."""
    first = scan.corrupt[0]
    more = f" (and {len(scan.corrupt) - 1} more line(s) after it)" if len(scan.corrupt) > 1 else ""
    return UserError(
        f"Optuna journal {scan.path}: line {first.number} is corrupt{more}, with complete records after it; "
        "nothing was changed: run `batchscope doctor --repair` to set the bad line(s) aside "
        "(it backs up the journal first)"
    )


def settle_journal(path: str | Path, lock: JournalFileOpenLock | None = None) -> JournalScan:
    """Make a journal safe to open: set a torn last record aside, refuse a corrupt middle one.

    Done under Optuna's lock (the type every process uses), so no append lands in between.
    In a folder we may not write to, nothing is changed: Optuna itself skips a torn last line.
    """
    path = Path(path)
    lock = lock or JournalFileOpenLock(str(path))
    try:
        lock.acquire()
    except OSError:  # read-only folder (or no room even for the lock file): look, change nothing
        scan = scan_journal(path)
        if scan.corrupt:
            raise corrupt_error(scan) from None
        if scan.torn:
            _logger.warning(
                "%s: its last record is incomplete (%d bytes) and is ignored; it cannot be set aside here "
                "(the folder is not writable)",
                path,
                scan.size - scan.complete_end,
            )
        return scan
    try:
        scan = scan_journal(path)
        if scan.corrupt:
            raise corrupt_error(scan)
        if scan.torn:
            with _open_for_append(path) as fd:
                sidecar = _set_aside(fd, path, scan.complete_end, scan.size, "torn")
            _warn_set_aside(path, scan.size - scan.complete_end, sidecar)
        return scan
    finally:
        lock.release()


class SafeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file backend, set to survive a torn write (see the module docstring)."""

    def __init__(self, file_path: str, lock_obj: JournalFileOpenLock | None = None) -> None:
        lock = lock_obj or JournalFileOpenLock(file_path)
        super().__init__(file_path, lock_obj=lock)
        self._open_lock = lock
        # One scan on opening; Optuna's replay and every later sync read only what is new.
        settle_journal(file_path, lock)

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as exc:  # Optuna's "Invalid log format.", JSONDecodeError, UnicodeDecodeError
            # Corruption that appeared after opening (the scan on opening refused any before).
            scan = scan_journal(self._file_path)
            if scan.corrupt:
                raise corrupt_error(scan) from None
            raise UserError(
                f"Optuna journal {self._file_path} could not be read ({str(exc)[:100]}); "
                "run `batchscope doctor` to check it"
            ) from None

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        path = Path(self._file_path)
        with _held(self._open_lock), _open_for_append(path) as fd:
            size = os.fstat(fd).st_size
            start = _torn_tail_start(fd, size)
            if start < size:  # a process died mid-write since we opened: do not glue onto its record
                _warn_set_aside(path, size - start, _set_aside(fd, path, start, size, "torn"))
            _append_whole(fd, data)


@contextlib.contextmanager
def _held(lock: JournalFileOpenLock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _open_for_append(path: Path) -> Iterator[int]:
    # O_APPEND: every write lands at the end, wherever the file has grown to.
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        yield fd
    finally:
        os.close(fd)


def _append_whole(fd: int, data: bytes) -> None:
    """Write `data` at the end and fsync it, or leave the file as it was: never a partial record.

    A write stopped part-way (a full disk takes part of it, then refuses the rest; Ctrl-C between
    two writes) is cut back off, and so is a whole one whose fsync failed (on NFS, a full disk may
    only say so then). One interrupted after a whole write stays: it is a complete record, and
    this process reads it back on its next sync like any other.
    """
    size = os.fstat(fd).st_size
    view, written = memoryview(data), 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
        os.fsync(fd)
    except BaseException as exc:
        if written < len(data) or isinstance(exc, OSError):
            try:
                os.ftruncate(fd, size)
            except OSError as cut:  # the tail check on the next open or append sets it aside instead
                _logger.warning("%s: a failed write could not be cut back off (%s)", _fd_name(fd), cut)
        raise


def _torn_tail_start(fd: int, size: int) -> int:
    """Where the run of incomplete lines at the end of the file begins (`size` if there is none).

    Reads back from the end only as far as the last complete record: a few KB per append.
    """
    end = size
    while end > 0:
        start = _line_start(fd, end)
        if is_record(os.pread(fd, end - start, start)):
            return end
        end = start
    return 0


def _line_start(fd: int, end: int) -> int:
    """The offset where the line ending at `end` begins (its own final newline excluded from the search)."""
    stop = end - 1
    while stop > 0:
        start = max(0, stop - _CHUNK)
        newline = os.pread(fd, stop - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        stop = start
    return 0


def _set_aside(fd: int, path: Path, start: int, size: int, kind: str) -> Path:
    """Move bytes [start, size) of the journal into a new sidecar file, then cut them off.

    The sidecar is written and synced first: a crash in between leaves the bytes in both places,
    never in neither.
    """
    data = os.pread(fd, size - start, start)
    try:
        sidecar = write_sidecar(path, kind, data)
    except OSError as exc:
        raise UserError(
            f"Optuna journal {path}: an incomplete record at its end cannot be set aside ({exc.strerror or exc}); "
            "free some space (or make the folder writable) and run the command again"
        ) from None
    os.ftruncate(fd, start)
    os.fsync(fd)
    return sidecar


def write_sidecar(path: Path, kind: str, data: bytes) -> Path:
    """A new file `<journal>.<kind>-<UTC time>` beside the journal holding `data`, synced."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        sidecar = path.with_name(f"{path.name}.{kind}-{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never overwrite an earlier one
        except FileExistsError:
            continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            sidecar.unlink(missing_ok=True)
            raise
        return sidecar
    raise FileExistsError(f"too many sidecar files named {path.name}.{kind}-{stamp}*")


def _warn_set_aside(path: Path, nbytes: int, sidecar: Path) -> None:
    _logger.warning(
        "%s: its last %d byte(s) were not a complete record (a write cut short by a crash or a full disk); "
        "set aside in %s; the study opens as of its last complete record",
        path,
        nbytes,
        sidecar,
    )


def _fd_name(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"file descriptor {fd}"


# ---- mending a corrupt journal (batchscope doctor) ---------------------------------------


@dataclass(frozen=True)
class Mend:
    """A journal as it would be with its bad lines set aside, checked to replay."""

    scan: JournalScan
    kept: bytes  # the journal's new contents: complete records only
    set_aside: bytes  # the lines taken out (bad lines, and complete records after a lost one)
    dropped_records: int  # complete records given up (0 unless the records after a bad line do not replay)
    why: str  # why records were given up; "" when none were


def mend_journal(scan: JournalScan, data: bytes) -> Mend:
    """Keep every complete record if, without the bad lines, they still replay consistently;
    else keep only the records before the first bad line.

    A bad line may have been a record that later ones refer to by position (Optuna numbers
    studies and trials in the order they were created): dropping it would quietly shift
    every later trial onto the wrong id. So the kept records must replay into a fresh
    JournalStorage, none may refer to a study or trial that does not exist at that point,
    and no bad line may still read as a creation.
    """
    bad = scan.corrupt + scan.tail
    if not bad:
        return Mend(scan, data, b"", 0, "")
    spans = [(b.start, b.end) for b in bad]
    kept = _without(data, spans)
    # A torn tail is safe to drop: nothing after it can refer to it.
    why = _unsafe_to_drop(data, scan.corrupt) or (_replay_problem(kept, bad[0].number) if scan.corrupt else "")
    set_aside = b"".join(data[s:e] for s, e in spans)
    if not why:
        return Mend(scan, kept, set_aside, 0, "")
    # A trial's creation still legible in part is rebuilt, so that the trials after it keep their ids.
    rebuilt = _rebuilt(data, scan)
    if rebuilt is not None and not _replay_problem(rebuilt, bad[0].number):
        return Mend(scan, rebuilt, set_aside, 0, "")
    first = bad[0].start
    prefix = data[:first]
    dropped = scan.records - prefix.count(b"\n")
    return Mend(scan, prefix, data[first:], dropped, why)


def _rebuilt(data: bytes, scan: JournalScan) -> bytes | None:
    """The journal with its bad lines out and each corrupt trial creation replaced by a placeholder
    (its study, state and start time where still legible; the attributes it carried are lost);
    None when no creation can be rebuilt or another creation cannot."""
    import re

    parts, pos, placed = [], 0, False
    for line in sorted(scan.corrupt + scan.tail, key=lambda b: b.start):
        parts.append(data[pos : line.start])
        pos = line.end
        text = data[line.start : line.end]
        codes = [int(c) for c in re.findall(rb'"op_code"\s*:\s*(\d+)', text)]
        if line not in scan.corrupt or not {_CREATE_STUDY, _CREATE_TRIAL} & set(codes):
            continue
        study = re.search(rb'"study_id"\s*:\s*(\d+)', text)
        if codes != [_CREATE_TRIAL] or study is None:
            return None  # a study's creation, or nothing to rebuild it from
        record: dict[str, Any] = {"op_code": _CREATE_TRIAL, "worker_id": "batchscope-doctor"}
        record["study_id"] = int(study.group(1))
        record["datetime_start"] = _legible_time(text) or _legible_time(data[: line.start], last=True)
        if (state := re.search(rb'"state"\s*:\s*(\d)\b', text)) is not None:
            record["state"] = int(state.group(1))
        parts.append(json.dumps(record).encode() + b"\n")
        placed = True
    parts.append(data[pos:])
    return b"".join(parts) if placed else None


def _legible_time(text: bytes, last: bool = False) -> str | None:
    """The first (or last) ISO time of a `datetime_*` field in `text` that parses."""
    import re

    found = re.findall(rb'"datetime_\w+"\s*:\s*"([0-9T:.+\-]+)"', text)
    for raw in reversed(found) if last else found:
        with contextlib.suppress(ValueError):
            return datetime.datetime.fromisoformat(raw.decode()).isoformat()
    return None


def _without(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    parts, pos = [], 0
    for start, end in spans:
        parts.append(data[pos:start])
        pos = end
    parts.append(data[pos:])
    return b"".join(parts)


def _unsafe_to_drop(data: bytes, bad: tuple[BadLine, ...]) -> str:
    """A reason not to drop the bad lines, read from what is left of them: a creation record."""
    import re

    for line in bad:
        codes = re.findall(rb'"op_code"\s*:\s*(\d+)', data[line.start : line.end])
        if any(int(c) in (_CREATE_STUDY, _CREATE_TRIAL) for c in codes):
            return f"line {line.number} was the creation of a study or trial that later records refer to"
    return ""


def _replay_problem(kept: bytes, first_bad: int) -> str:
    """Why `kept` does not replay cleanly ("" if it does): by our reference check, then by Optuna's."""
    dangling = _first_dangling(kept)
    if dangling:
        return f"without line {first_bad}, {dangling}"
    import optuna

    with tempfile.TemporaryDirectory(prefix="batchscope-mend-") as tmp:
        copy = Path(tmp) / "optuna.journal"
        copy.write_bytes(kept)
        try:
            storage = optuna.storages.JournalStorage(SafeJournalFileBackend(str(copy)))
            for study in storage.get_all_studies():
                storage.get_all_trials(study._study_id, deepcopy=False)
        except Exception as exc:  # whatever Optuna raises on replay: keep the prefix instead
            return f"without line {first_bad}, Optuna cannot replay the rest ({type(exc).__name__}: {exc})"
    return ""


def _first_dangling(kept: bytes) -> str:
    """The first record referring to a study or trial not created before it (the sign of a lost creation).

    Ids are given as Optuna's replay gives them: studies and trials numbered in order of creation.
    """
    live: dict[int, str] = {}  # study id → name
    deleted: set[int] = set()
    next_study, trials = 0, 0
    for number, start, end in _lines(kept):
        log = json.loads(kept[start:end])
        op = log["op_code"]
        if op == _CREATE_STUDY:
            if log.get("study_name") not in live.values():
                live[next_study] = str(log.get("study_name"))
                next_study += 1
        elif op in _STUDY_OPS:
            study_id = log.get("study_id")
            if study_id not in live and study_id not in deleted:
                return f"record {number} refers to study id {study_id}, which does not exist at that point"
            if op == _DELETE_STUDY and study_id in live:
                del live[study_id]
                deleted.add(study_id)
            if op == _CREATE_TRIAL and study_id in live:
                trials += 1
        elif op in _TRIAL_OPS and not (isinstance(log.get("trial_id"), int) and 0 <= log["trial_id"] < trials):
            return f"record {number} refers to trial id {log.get('trial_id')}, which does not exist at that point"
    return ""


def mend_journal_file(path: Path) -> tuple[Mend, Path | None]:
    """Set the journal's bad lines aside, as `mend_journal` decides, under Optuna's lock.

    Read, decided and rewritten while holding the lock, so no append is lost in between. The
    lines taken out go to a sidecar first; the new contents are written beside the journal and
    renamed over it, so it is whole at every moment. Returns the mend and the sidecar (None if
    the journal was healthy).
    """
    lock = JournalFileOpenLock(str(path))
    with _held(lock):
        data = path.read_bytes()
        mend = mend_journal(scan_journal(path, data), data)
        if not mend.set_aside:
            return mend, None
        sidecar = write_sidecar(path, "corrupt" if mend.scan.corrupt else "torn", mend.set_aside)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(mend.kept)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return mend, sidecar

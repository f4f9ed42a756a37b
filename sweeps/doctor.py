"""`batchscope doctor`: check both stores of a sweep, and with `--repair` fix what can be fixed safely.

What it looks at: the Optuna journal (records complete, a torn tail, corrupt lines), the local
MLflow database (SQLite's integrity check, MLflow's schema: `doctor_mlflow`), and for each study
the tracking contract (`doctor_study`): no trial RUNNING for a worker that is gone, no run RUNNING
after its trial ended, Optuna trials and MLflow runs one to one, no study that MLflow knows but
Optuna lost, and no `batchscope train` run RUNNING after its process stopped.

Repairs only what loses nothing: every file a repair writes to is copied into
`mlruns/backups/<UTC time>/` first, and lines taken out of the journal go to a sidecar file
beside it. A dead trial is failed and queued again as a resumed sweep would do it
(`Sweep.recover`), so the same sweep command then continues the study.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console
from rich.markup import escape

from batchscope.sweeps.doctor_finding import Finding
from batchscope.sweeps.doctor_mlflow import copy_sqlite, mlflow_studies, sqlite_health
from batchscope.sweeps.doctor_study import check_study
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.journal import mend_journal, mend_journal_file, scan_journal
from batchscope.sweeps.store_setup import (
    Stores,
    check_tracking,
    journal_storage,
    open_storage,
    quiet_libraries,
    redact,
    resolve,
    root_dir,
)

__all__ = ["Doctor", "Finding", "cmd_doctor"]


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit code 0: healthy (or repaired); 1: problems left; 2 (UserError): nothing to check, a store unreachable."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    quiet_libraries()
    stores = resolve(args.storage, args.tracking_uri, fields=("--storage", "--tracking-uri"))
    console = Console()
    with Doctor(stores, study=args.study, repair=args.repair) as doctor:
        try:
            findings = doctor.run()
        except (OSError, sqlite3.Error, SQLAlchemyError, MlflowException) as exc:
            # A store the checks cannot even read: say which, in one line (the doctor is for broken stores).
            raise UserError(f"batchscope doctor could not read the stores: {_first_line(exc)}") from None
        _print(console, findings, doctor)
    return 1 if any(f.open for f in findings) else 0


class Doctor:
    """The checks, in the order a repair needs them: journal, MLflow database, then each study."""

    def __init__(self, stores: Stores, *, study: str | None = None, repair: bool = False) -> None:
        self.stores = stores
        self.study = study
        self.repair = repair
        self.backup_dir: Path | None = None
        self.backed_up: dict[str, Path] = {}
        self.preview = False  # True: studies were read from the journal as a repair would leave it
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Doctor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # ---- the whole run -----------------------------------------------------------------
    def run(self) -> list[Finding]:
        journal = self._journal_path()
        db = self._sqlite_path()
        if journal is not None and not journal.exists() and (db is None or not db.exists()):
            raise UserError(f"nothing to check: {journal} does not exist (no sweep has run here; --storage?)")
        findings = self._check_journal(journal) if journal is not None else []
        storage = self._open_optuna(journal)
        db_findings, tracker = self._check_mlflow(db)
        findings += db_findings
        for name in self._study_names(storage, tracker):
            findings += check_study(name, storage, tracker, self.stores)
        if self.repair:
            self._apply([f for f in findings if f.fix is not None and not f.done])
        return findings

    def _apply(self, findings: list[Finding]) -> None:
        for f in findings:
            try:
                for store in f.touches:
                    self._backup(store)
                f.done = "repaired: " + f.fix() if f.fix is not None else ""
            except Exception as exc:  # one failed repair does not stop the others; it stays a problem
                f.done = f"not repaired: {_first_line(exc)}"

    # ---- the Optuna journal ------------------------------------------------------------
    def _journal_path(self) -> Path | None:
        url = self.stores.storage_url
        return None if "://" in url else Path(url)

    def _check_journal(self, path: Path) -> list[Finding]:
        if not path.exists():
            return [Finding("journal", f"no Optuna journal at {path}", level="note")]
        try:
            data = path.read_bytes()
        except OSError as exc:
            return [Finding("journal", f"{path} cannot be read: {exc.strerror or exc}")]
        scan = scan_journal(path, data)
        if scan.healthy:
            return [Finding("journal", f"{path}: {scan.records} complete records", "ok")]
        mend = mend_journal(scan, data)
        findings = []
        if scan.corrupt:
            lines = ", ".join(str(b.number) for b in scan.corrupt[:10]) + (" …" if len(scan.corrupt) > 10 else "")
            if mend.dropped_records:
                keep = (
                    f"keep only the records before line {scan.corrupt[0].number} ({mend.why}); "
                    f"the {mend.dropped_records} complete record(s) after it go to the sidecar as well"
                )
            else:
                keep = f"set the bad line(s) aside into a sidecar file; keep all {scan.records} complete records"
            findings.append(
                Finding("journal", f"{path}: line(s) {lines} corrupt, with complete records after them", repair=keep)
            )
        if scan.torn:
            first, last = scan.tail[0].number, scan.tail[-1].number
            lines = f"line {first}" if first == last else f"lines {first}–{last}"
            findings.append(
                Finding(
                    "journal",
                    f"{path}: its last {scan.size - scan.complete_end} byte(s) ({lines}) are not a complete record "
                    "(a write cut short)",
                    repair="set them aside into a sidecar file (any batchscope command does this on opening)",
                )
            )
        # One rewrite repairs both; it runs now, so that the studies are read from the repaired journal.
        findings[0].fix = lambda: self._mend(path)
        findings[0].touches = ("journal",)
        if self.repair:
            self._apply(findings[:1])
            for f in findings[1:]:
                f.done = findings[0].done
        return findings

    def _mend(self, path: Path) -> str:
        mend, sidecar = mend_journal_file(path)
        if sidecar is None:
            return "nothing left to set aside"
        kept = mend.scan.records - mend.dropped_records
        if mend.dropped_records:
            first = mend.scan.corrupt[0].number
            return f"kept the {kept} records before line {first} ({mend.why}); the rest is in {sidecar}"
        return f"set {len(mend.set_aside)} byte(s) aside in {sidecar}; kept all {kept} complete records"

    def _open_optuna(self, journal: Path | None) -> optuna.storages.BaseStorage | None:
        """The Optuna storage to read the studies from. A journal still needing repair is read
        from a scratch copy as the repair would leave it, and nothing is written to it."""
        if journal is None:
            return open_storage(self.stores, heartbeat=False)
        try:
            data = journal.read_bytes()
        except OSError:  # said by _check_journal
            return None
        scan = scan_journal(journal, data)
        if scan.healthy:
            return journal_storage(journal)
        self.preview = True
        scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="batchscope-doctor-")))
        copy = scratch / journal.name
        copy.write_bytes(mend_journal(scan, data).kept)
        return journal_storage(copy)

    # ---- the MLflow database -----------------------------------------------------------
    def _sqlite_path(self) -> Path | None:
        uri = self.stores.tracking_uri
        return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None

    def _check_mlflow(self, db: Path | None) -> tuple[list[Finding], Any]:
        """Findings about the MLflow store, and a Tracker when its runs can be read (else None)."""
        from batchscope.sweeps.tracking import Tracker

        if db is None:
            check_tracking(self.stores, create=False)  # a server that does not answer: one line, exit 2
            return [], Tracker(self.stores.tracking_uri, self.stores.artifact_root)
        if not db.exists():
            return [Finding("MLflow", f"no MLflow database at {db}", level="note")], None
        finding = sqlite_health(db)
        if finding.problem:
            if finding.fix is None and finding.repair:
                finding.fix = lambda: self._set_db_aside(db)
                finding.touches = ()
            return [finding], None
        return [finding], Tracker(self.stores.tracking_uri, self.stores.artifact_root)

    def _set_db_aside(self, db: Path) -> str:
        """Move a half-built database that holds no run into the backups; the next sweep makes a new one."""
        target = self._backup_folder()
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists():
                shutil.move(str(path), str(target / path.name))
        return f"moved it to {target}; the next sweep makes a new one"

    # ---- studies -----------------------------------------------------------------------
    def _study_names(self, storage: optuna.storages.BaseStorage | None, tracker: Any) -> list[str]:
        in_optuna = [s.study_name for s in storage.get_all_studies()] if storage is not None else []
        in_mlflow = mlflow_studies(tracker.client) if tracker is not None else []
        names = list(dict.fromkeys(in_optuna + in_mlflow))
        if self.study is None:
            return names
        if self.study not in names:
            raise UserError(
                f"no study named {self.study!r} in {self.stores.storage_label} or {redact(self.stores.tracking_uri)}; "
                f"known studies: {', '.join(names) or 'none'}"
            )
        return [self.study]

    # ---- backups -----------------------------------------------------------------------
    def _backup_folder(self) -> Path:
        if self.backup_dir is None:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            base = root_dir() / "backups"
            folder = base / stamp
            n = 1
            while folder.exists():
                folder = base / f"{stamp}-{n}"
                n += 1
            folder.mkdir(parents=True)
            self.backup_dir = folder
        return self.backup_dir

    def _backup(self, store: str) -> None:
        """Copy a store's file into the backup folder, once per run, before the first repair that writes to it."""
        if store in self.backed_up:
            return
        source = self._journal_path() if store == "journal" else self._sqlite_path()
        if source is None or not source.exists():
            self.backed_up[store] = Path("-")  # a server or database: nothing here to copy
            return
        target = self._backup_folder() / source.name
        if store == "mlflow":
            copy_sqlite(source, target)
        else:
            shutil.copy2(source, target)
        self.backed_up[store] = target


def _first_line(exc: BaseException) -> str:
    """An error's first line, credentials masked (a driver may echo its URL)."""
    from batchscope.sweeps.locations import redact

    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def _print(console: Console, findings: list[Finding], doctor: Doctor) -> None:
    """One line per finding (long paths stay whole, and grep finds them), its repair indented below."""
    console.print("[bold]batchscope doctor[/]" + (" --repair" if doctor.repair else ""))
    for f in findings:
        if not f.problem:
            mark = {"ok": "[green]ok     [/]", "note": "[yellow]note   [/]"}[f.level]
        elif f.done.startswith("repaired"):
            mark = "[green]fixed  [/]"
        else:
            mark = "[red]problem[/]"
        console.print(f"{mark} {escape(f.where)}: {escape(f.what)}", highlight=False, soft_wrap=True)
        if f.done:
            console.print(f"          {escape(f.done)}", highlight=False, soft_wrap=True)
        elif f.problem:
            action = f"--repair: {f.repair}" if f.repair else "cannot be repaired safely"
            console.print(f"          {escape(action)}", highlight=False, soft_wrap=True)
    if doctor.preview:
        console.print(
            "The studies were read from the journal as --repair would leave it (nothing was changed).", soft_wrap=True
        )
    if doctor.backup_dir is not None:
        console.print(f"Backups of the files changed: {escape(str(doctor.backup_dir))}", soft_wrap=True)
    remaining = [f for f in findings if f.open]
    if not remaining:
        console.print("[green]Healthy.[/]" if not doctor.repair else "[green]Healthy after the repairs above.[/]")
    elif any(f.repair for f in remaining) and not doctor.repair:
        console.print(f"{len(remaining)} problem(s); run [bold]batchscope doctor --repair[/] to fix those it can.")
    else:
        console.print(f"{len(remaining)} problem(s) left: see above.")

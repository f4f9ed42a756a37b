"""`batchscope doctor`: check both stores of a sweep, and with `--repair` fix what can be fixed safely.

What it looks at: the Optuna journal (records complete, a torn tail, corrupt lines), the local
MLflow database (SQLite's integrity check, MLflow's schema), and for each study the tracking
contract: no trial RUNNING for a worker that is gone, no run RUNNING after its trial ended,
Optuna trials and MLflow runs one to one, and no study that MLflow knows but Optuna lost.

Repairs only what loses nothing: every file a repair writes to is copied into
`mlruns/backups/<UTC time>/` first, and lines taken out of the journal go to a sidecar file
beside it. A dead trial is failed and queued again as a resumed sweep would do it
(`Sweep.recover`), so the same sweep command then continues the study.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape

from sweeps.errors import UserError
from sweeps.journal import mend_journal, mend_journal_file, scan_journal
from sweeps.stores import Stores, check_tracking, journal_storage, open_storage, quiet_libraries, resolve, root_dir

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
_MLFLOW_TABLES = {"alembic_version", "experiments", "runs", "metrics", "params", "tags"}
_DOCTOR_REASON = "left RUNNING by a process that stopped; closed by batchscope doctor"


@dataclass
class Finding:
    """One thing the doctor looked at: a problem (with the repair it allows, if any), or a note."""

    where: str
    what: str
    level: str = "problem"  # "problem", "note" (worth knowing, nothing to repair) or "ok"
    repair: str = ""  # what --repair does about it; "" when it cannot be repaired safely
    fix: Callable[[], str] | None = None  # does the repair; returns what it did
    touches: tuple[str, ...] = ()  # the stores the repair writes to: "journal", "mlflow"
    done: str = ""  # after --repair: what was done, or why not

    @property
    def problem(self) -> bool:
        return self.level == "problem"

    @property
    def open(self) -> bool:
        return self.problem and not self.done.startswith("repaired")


@dataclass
class _Study:
    """A study's trials and runs, read once."""

    name: str
    storage: optuna.storages.BaseStorage
    study: optuna.Study
    trials: dict[int, FrozenTrial]
    experiment_id: str | None
    runs: list[Any]  # MLflow child runs (batchscope.role = trial), active ones
    parent_run_id: str | None
    runs_by_trial: dict[int, list[Any]] = field(default_factory=dict)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit code 0: healthy (or repaired); 1: problems left; 2 (UserError): nothing to check, a store unreachable."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    quiet_libraries()
    stores = resolve(args.storage, args.tracking_uri)
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
            findings += self._check_study(name, storage, tracker)
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
        from sweeps.tracking import Tracker

        if db is None:
            check_tracking(self.stores, create=False)  # a server that does not answer: one line, exit 2
            return [], Tracker(self.stores.tracking_uri, self.stores.artifact_root)
        if not db.exists():
            return [Finding("MLflow", f"no MLflow database at {db}", level="note")], None
        finding = _sqlite_health(db)
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
        in_mlflow = _mlflow_studies(tracker.client) if tracker is not None else []
        names = list(dict.fromkeys(in_optuna + in_mlflow))
        if self.study is None:
            return names
        if self.study not in names:
            raise UserError(
                f"no study named {self.study!r} in {self.stores.storage_label} or {self.stores.tracking_uri}; "
                f"known studies: {', '.join(names) or 'none'}"
            )
        return [self.study]

    def _check_study(self, name: str, storage: optuna.storages.BaseStorage | None, tracker: Any) -> list[Finding]:
        where = f"study {name}"
        exp = tracker.client.get_experiment_by_name(name) if tracker is not None else None
        runs = _child_runs(tracker.client, exp.experiment_id) if exp is not None else []
        known = [s.study_name for s in storage.get_all_studies()] if storage is not None else []
        if name not in known:
            if not runs:
                return []
            return [
                Finding(
                    where,
                    f"MLflow holds {len(runs)} trial run(s) of it, but the Optuna storage {self.stores.storage_label} "
                    "has no such study (its journal was emptied or replaced); restore the journal from a backup or "
                    "a sidecar file, or sweep under a new study name",
                )
            ]
        assert storage is not None
        study = optuna.load_study(study_name=name, storage=storage)
        s = _Study(
            name,
            storage,
            study,
            {t.number: t for t in study.get_trials(deepcopy=False)},
            exp.experiment_id if exp is not None else None,
            runs,
            _sweep_run_id(tracker.client, exp.experiment_id) if exp is not None else None,
        )
        for run in runs:
            number = _trial_number(run)
            if number is not None:
                s.runs_by_trial.setdefault(number, []).append(run)
        findings = self._dead_trials(s, tracker) + self._stray_runs(s, tracker) + self._unlinked_trials(s, tracker)
        linked = sum(1 for t in s.trials.values() if _linked_runs(t))
        if tracker is None and linked:
            findings.append(
                Finding(where, f"{linked} trial(s) refer to MLflow runs, but {self.stores.tracking_uri} cannot be read")
            )
        if not findings and tracker is not None:
            findings.append(
                Finding(where, f"{len(s.trials)} trial(s), {len(runs)} run(s): one to one, none left RUNNING", "ok")
            )
        return findings

    def _dead_trials(self, s: _Study, tracker: Any) -> list[Finding]:
        from sweeps.runner import _worker_alive

        findings = []
        for t in s.trials.values():
            if t.state != TrialState.RUNNING:
                continue
            worker = t.user_attrs.get("worker")
            if _worker_alive(worker, t.datetime_start):
                continue
            again = " and queue it to run again with the same parameters" if _sampled(t) else ""
            findings.append(
                Finding(
                    f"study {s.name}",
                    f"trial {t.number} is RUNNING, but its worker {worker or '(none recorded)'} is not running",
                    repair=f"fail it (as a resumed sweep would){again}; close its runs as KILLED",
                    fix=functools.partial(self._fail_dead_trial, s, t, tracker),
                    touches=("journal", "mlflow") if tracker is not None else ("journal",),
                )
            )
        return findings

    def _fail_dead_trial(self, s: _Study, t: FrozenTrial, tracker: Any) -> str:
        """What `Sweep._fail_and_requeue` does on resume, and its runs closed (`close_stale_runs`)."""
        from sweeps.runner import Sweep, _stopped_reason
        from sweeps.tracking import REASON, STATUS, STUDY, TRIAL

        storage = s.storage
        reason = _stopped_reason(t, "its worker stopped")
        linked = _linked_runs(t)
        tagged = [r.info.run_id for r in s.runs_by_trial.get(t.number, [])]
        run_ids = linked + [rid for rid in tagged if rid not in linked]
        did = []
        if not run_ids and tracker is not None and s.experiment_id is not None and s.parent_run_id is not None:
            # Killed before creating its run: a closed one keeps trials and runs one to one.
            tags = {STUDY: s.name, TRIAL: str(t.number), STATUS: "failed"}
            run_ids = [tracker.trial_run(s.experiment_id, s.parent_run_id, f"trial {t.number}", dict(t.params), tags)]
            did.append("recorded a closed run for it")
        if run_ids != linked:
            storage.set_trial_user_attr(t._trial_id, "mlflow_run_ids", run_ids)
            storage.set_trial_user_attr(t._trial_id, "mlflow_run_id", t.user_attrs.get("mlflow_run_id", run_ids[0]))
            if any(rid not in linked for rid in tagged):
                did.append("linked its runs by their tags")
        storage.set_trial_user_attr(t._trial_id, "status", "failed")
        storage.set_trial_user_attr(t._trial_id, "reason", reason)
        if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            return "another process ended it first"
        did.append("failed it")
        if _sampled(t):
            Sweep._requeue(s.study, t)
            did.append("queued it again with the same parameters")
        if tracker is not None:
            for run_id in run_ids:
                if tracker.client.get_run(run_id).info.status == "RUNNING":
                    tracker.end(run_id, "KILLED", tags={STATUS: "failed", REASON: reason})
                    did.append(f"closed run {run_id} as KILLED")
        return "; ".join(did)

    def _stray_runs(self, s: _Study, tracker: Any) -> list[Finding]:
        """Runs left RUNNING after their trial ended, and runs whose trial the study does not have."""
        findings = []
        for run in s.runs:
            run_id, number = run.info.run_id, _trial_number(run)
            trial = s.trials.get(number) if number is not None else None
            if trial is None:
                findings.append(
                    Finding(
                        f"study {s.name}",
                        f"run {run_id} says trial {number}, which the study does not have (lost with the journal?)",
                        repair="close it if RUNNING, and mark it deleted in MLflow (restorable: mlflow runs restore); "
                        "a new trial with that number would otherwise repeat it",
                        fix=functools.partial(self._retire_run, tracker, run),
                        touches=("mlflow",),
                    )
                )
            elif run.info.status == "RUNNING" and trial.state != TrialState.RUNNING:
                findings.append(
                    Finding(
                        f"study {s.name}",
                        f"run {run_id} of trial {number} is RUNNING, but its trial is {trial.state.name}",
                        repair="close it as KILLED with a batchscope.reason",
                        fix=functools.partial(self._close_run, tracker, run),
                        touches=("mlflow",),
                    )
                )
            elif trial.state != TrialState.RUNNING and run_id not in _linked_runs(trial):
                findings.append(
                    Finding(
                        f"study {s.name}",
                        f"run {run_id} has trial {number}'s tag, but the trial does not list it (an earlier attempt?)",
                        level="note",
                    )
                )
        return findings

    def _close_run(self, tracker: Any, run: Any) -> str:
        from sweeps.tracking import REASON, STATUS

        tags = {REASON: _DOCTOR_REASON}
        if run.data.tags.get(STATUS) in (None, "", "running"):
            tags[STATUS] = "failed"
        tracker.end(run.info.run_id, "KILLED", tags=tags)
        return "closed as KILLED"

    def _retire_run(self, tracker: Any, run: Any) -> str:
        from sweeps.tracking import REASON

        if run.info.status == "RUNNING":
            self._close_run(tracker, run)
        tracker.client.set_tag(run.info.run_id, REASON, "its Optuna trial was lost; set aside by batchscope doctor")
        tracker.client.delete_run(run.info.run_id)
        return f"closed and marked deleted (mlflow runs restore --run-id {run.info.run_id} brings it back)"

    def _unlinked_trials(self, s: _Study, tracker: Any) -> list[Finding]:
        """Finished trials without their MLflow run (RUNNING ones are linked when failed, above)."""
        if tracker is None:
            return []
        findings = []
        ids = {r.info.run_id for r in s.runs}
        for t in s.trials.values():
            if t.state not in FINISHED:
                continue
            linked = _linked_runs(t)
            tagged = s.runs_by_trial.get(t.number, [])
            if not linked and tagged:
                findings.append(
                    Finding(
                        f"study {s.name}",
                        f"trial {t.number} lists no MLflow run; run {tagged[0].info.run_id} has its tag (reports find "
                        "it so; Optuna cannot change a finished trial)",
                        level="note",
                    )
                )
            elif not linked:
                findings.append(Finding(f"study {s.name}", f"trial {t.number} ({t.state.name}) has no MLflow run"))
            elif missing := [rid for rid in linked if rid not in ids]:
                findings.append(
                    Finding(
                        f"study {s.name}",
                        f"trial {t.number} refers to MLflow run(s) {', '.join(missing)}, which the experiment does "
                        "not hold (deleted, or another MLflow store?)",
                    )
                )
        return findings

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
            _copy_sqlite(source, target)
        else:
            shutil.copy2(source, target)
        self.backed_up[store] = target


def _first_line(exc: BaseException) -> str:
    """An error's first line, credentials masked (a driver may echo its URL)."""
    from sweeps.stores import redact

    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def _sqlite_health(db: Path) -> Finding:
    """SQLite's integrity check and MLflow's tables, read-only."""
    try:
        conn = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return Finding("MLflow", f"{db} cannot be opened: {exc}")
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if rows != ["ok"]:
            return Finding(
                "MLflow",
                f"{db} fails SQLite's integrity check: {'; '.join(rows[:3])}; restore it from a backup",
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = sorted(_MLFLOW_TABLES - tables)
        if missing:
            holds_runs = "runs" in tables and conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] > 0
            return Finding(
                "MLflow",
                f"{db} is not a whole MLflow store (no {', '.join(missing)}: made while the disk was full?)",
                repair="" if holds_runs else "move it into the backups; the next sweep makes a new one",
            )
        version = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.Error as exc:
        return Finding("MLflow", f"{db} cannot be read as an SQLite database: {exc}")
    finally:
        conn.close()
    head = _mlflow_schema_head()
    if head is not None and version != [head]:
        return Finding(
            "MLflow",
            f"{db} has MLflow schema {version or 'none'}, this MLflow expects {head}: "
            f"run `mlflow db upgrade sqlite:///{db}` (after a backup)",
        )
    return Finding("MLflow", f"{db}: integrity ok, MLflow schema {version[0] if version else '?'}", "ok")


def _mlflow_schema_head() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return str(_get_latest_schema_revision())
    except Exception:  # a private helper of MLflow's: without it, the version is not compared
        return None


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of an SQLite database (its WAL included), by SQLite's backup API."""
    try:
        src = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error:  # a damaged file: keep its bytes as they are
        shutil.copy2(source, target)


def _mlflow_studies(client: Any) -> list[str]:
    """Experiments made by batchscope sweeps (their `optuna.study` tag)."""
    from sweeps.tracking import STUDY

    return [e.name for e in _pages(lambda token: client.search_experiments(page_token=token)) if STUDY in e.tags]


def _child_runs(client: Any, experiment_id: str) -> list[Any]:
    from mlflow.entities.view_type import ViewType

    from sweeps.tracking import ROLE

    return list(
        _pages(
            lambda token: client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{ROLE}` = 'trial'",
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
        )
    )


def _sweep_run_id(client: Any, experiment_id: str) -> str | None:
    from mlflow.entities.view_type import ViewType

    from sweeps.tracking import ROLE

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE}` = 'sweep'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return str(runs[0].info.run_id) if runs else None


def _pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = search(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def _trial_number(run: Any) -> int | None:
    from sweeps.tracking import TRIAL

    try:
        return int(run.data.tags.get(TRIAL, ""))
    except ValueError:
        return None


def _linked_runs(t: FrozenTrial) -> list[str]:
    ids = t.user_attrs.get("mlflow_run_ids")
    if ids:
        return [str(i) for i in ids]
    return [str(t.user_attrs["mlflow_run_id"])] if "mlflow_run_id" in t.user_attrs else []


def _sampled(t: FrozenTrial) -> bool:
    from sweeps import space

    return bool(space.sampled(t.params))


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
